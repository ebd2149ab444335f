// The calls in progress, fetched again every second while the page is open.
// The fragment is rendered (and escaped) by the server; a session that has
// ended shows the login page instead.
(function () {
  var box = document.getElementById("calls");
  if (!box || !box.dataset.live) { return; }
  setInterval(function () {
    fetch(box.dataset.live, {credentials: "same-origin", redirect: "manual"}).then(function (r) {
      if (r.ok) { return r.text().then(function (html) { box.innerHTML = html; }); }
      location.reload();
    }).catch(function () {});
  }, 1000);
})();
