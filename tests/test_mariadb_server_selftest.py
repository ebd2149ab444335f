"""Self-test of the throwaway MariaDB server helper."""

import time
import urllib.parse

import pytest

from mariadb_server import MariaDBServer, find_mariadbd

pymysql = pytest.importorskip("pymysql")

pytestmark = pytest.mark.skipif(find_mariadbd() is None, reason="mariadbd not installed")


def connect(url: str):
    u = urllib.parse.urlsplit(url)
    return pymysql.connect(host=u.hostname, port=u.port, user=u.username,
                           password=u.password, database=u.path.lstrip("/"),
                           autocommit=True)


def test_start_kill_restart_stop(tmp_path):
    server = MariaDBServer(tmp_path / "mariadb")
    t0 = time.monotonic()
    server.start()
    print(f"first start (incl. install-db): {time.monotonic() - t0:.2f}s")
    try:
        url = server.url("astbill_test")
        assert url.startswith(f"mysql://root:{server.password}@127.0.0.1:{server.port}/")
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            assert "MariaDB" in cur.fetchone()[0]
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(20)) ENGINE=InnoDB")
            cur.execute("INSERT INTO t VALUES (1, 'survivor')")

        server.kill()
        with pytest.raises(pymysql.err.OperationalError):
            connect(url)

        t0 = time.monotonic()
        server.restart()
        print(f"restart after kill: {time.monotonic() - t0:.2f}s")
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM t WHERE id = 1")
            assert cur.fetchone() == ("survivor",)
            cur.execute("SELECT ENGINE FROM information_schema.TABLES"
                        " WHERE TABLE_SCHEMA = 'astbill_test' AND TABLE_NAME = 't'")
            assert cur.fetchone() == ("InnoDB",)

        other = server.create_database("astbill_other")
        with connect(other) as conn, conn.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            assert cur.fetchone() == ("astbill_other",)
        server.drop_database("astbill_other")
        assert "astbill_other" not in server.execute("SHOW DATABASES")
    finally:
        server.stop()
    assert not server.running
