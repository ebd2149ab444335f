-- Version 7: who may administer AstBill, and who did each change of a
-- balance.  Staff users log in with a password (kept as a salted scrypt
-- hash); programs (a shop, a script) call the HTTP API with a token (kept
-- as its SHA-256: the token itself is shown once, when it is made).

CREATE TABLE astuser (
  name          VARCHAR(80)   NOT NULL,
  role          VARCHAR(16)   NOT NULL,  -- admin, support
  password_hash VARCHAR(255)  NOT NULL,  -- scrypt$N$r$p$salt$hash
  created       {time}        NOT NULL,
  PRIMARY KEY (name)
) {table};

CREATE TABLE asttoken (
  name          VARCHAR(80)   NOT NULL,
  role          VARCHAR(16)   NOT NULL,  -- admin, support, shop
  token_hash    CHAR(64)      NOT NULL,  -- hex SHA-256 of the token
  created       {time}        NOT NULL,
  PRIMARY KEY (name)
) {table};

CREATE UNIQUE INDEX asttoken_hash ON asttoken (token_hash);

-- A top-up or adjustment made with an Idempotency-Key: the same key again,
-- from the same token, gets this result and changes nothing; another
-- request with it is refused.  Each token has keys of its own: one shop's
-- key neither answers nor reveals another's.
CREATE TABLE astidempotency (
  actor         VARCHAR(100)  NOT NULL,  -- token:NAME
  idem_key      VARCHAR(80)   NOT NULL,
  account       VARCHAR(80)   NOT NULL,
  fingerprint   CHAR(64)      NOT NULL,  -- SHA-256 of what was asked
  result        TEXT          NOT NULL,  -- the answer given, JSON
  created       {time}        NOT NULL,
  PRIMARY KEY (actor, idem_key)
) {table};

-- Names and keys match exactly, as account names do (see step 6): on MySQL
-- "ALICE" or "alice " would otherwise log in as alice.
--@ mysql
ALTER TABLE astuser MODIFY name VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
--@ mysql
ALTER TABLE asttoken MODIFY name VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
--@ mysql
ALTER TABLE astidempotency MODIFY actor VARCHAR(100) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
--@ mysql
ALTER TABLE astidempotency MODIFY idem_key VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
--@ mysql
ALTER TABLE astidempotency MODIFY account VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;

-- Who made a change by hand: the user or token (NULL for calls, and for
-- rows older than this step).
ALTER TABLE astledger ADD COLUMN actor VARCHAR(100) NULL;
