-- AstBill schema for SQLite.  Money is stored as INTEGER millionths
-- (exact, and SUM stays exact); the application converts to Decimal.
-- Safe to load twice.

CREATE TABLE IF NOT EXISTS astaccount (
  account     VARCHAR(80)   NOT NULL,
  tariff      VARCHAR(40)   NOT NULL,
  balance     INTEGER       NOT NULL,
  reserved    INTEGER       NOT NULL DEFAULT 0,  -- sum of its calls' max_cost in astcreditres
  created     TEXT          NOT NULL,
  PRIMARY KEY (account)
);

-- One row per prefix of a tariff; the per-call lookup probes every prefix
-- of the dialled number through the primary key.
CREATE TABLE IF NOT EXISTS astrate (
  tariff      VARCHAR(40)   NOT NULL,
  prefix      VARCHAR(32)   NOT NULL,
  destination VARCHAR(80)   NOT NULL,
  rate        INTEGER       NOT NULL,  -- per minute
  connect_fee INTEGER       NOT NULL,
  min_secs    INT           NOT NULL,
  increment   INT           NOT NULL,
  PRIMARY KEY (tariff, prefix)
);

-- Calls in progress: what each may still cost.
CREATE TABLE IF NOT EXISTS astcreditres (
  uniqueid    VARCHAR(150)  NOT NULL,
  account     VARCHAR(80)   NOT NULL,
  max_cost    INTEGER       NOT NULL,
  max_secs    INT           NOT NULL,
  created     TEXT          NOT NULL,
  PRIMARY KEY (uniqueid)
);

-- Asterisk's own CDR columns, then the billing ones.
CREATE TABLE IF NOT EXISTS astcdr (
  uniqueid    VARCHAR(150)  NOT NULL,
  start       TEXT          NOT NULL,
  answer      TEXT          NULL,
  end         TEXT          NULL,
  clid        VARCHAR(80)   NOT NULL DEFAULT '',
  src         VARCHAR(80)   NOT NULL DEFAULT '',
  dst         VARCHAR(80)   NOT NULL DEFAULT '',
  dcontext    VARCHAR(80)   NOT NULL DEFAULT '',
  channel     VARCHAR(80)   NOT NULL DEFAULT '',
  dstchannel  VARCHAR(80)   NOT NULL DEFAULT '',
  lastapp     VARCHAR(80)   NOT NULL DEFAULT '',
  lastdata    VARCHAR(255)  NOT NULL DEFAULT '',
  duration    INT           NOT NULL DEFAULT 0,
  billsec     INT           NOT NULL DEFAULT 0,
  disposition VARCHAR(45)   NOT NULL DEFAULT '',
  amaflags    INT           NOT NULL DEFAULT 3,
  accountcode VARCHAR(80)   NOT NULL DEFAULT '',
  peeraccount VARCHAR(80)   NOT NULL DEFAULT '',
  linkedid    VARCHAR(150)  NOT NULL DEFAULT '',
  userfield   VARCHAR(255)  NOT NULL DEFAULT '',
  sequence    INT           NOT NULL DEFAULT 0,
  account     VARCHAR(80)   NOT NULL,
  tariff      VARCHAR(40)   NOT NULL,
  prefix      VARCHAR(32)   NOT NULL,
  rate        INTEGER       NOT NULL,
  connect_fee INTEGER       NOT NULL,
  min_secs    INT           NOT NULL,
  increment   INT           NOT NULL,
  max_secs    INT           NOT NULL,
  cost        INTEGER       NULL,
  state       VARCHAR(16)   NOT NULL,  -- active, settled, released, charged, late, unbilled
  PRIMARY KEY (uniqueid)
);

-- Every change of a balance, written in the transaction that makes it.
CREATE TABLE IF NOT EXISTS astledger (
  id          INTEGER       NOT NULL,
  account     VARCHAR(80)   NOT NULL,
  amount      INTEGER       NOT NULL,  -- signed: + credit, - charge
  kind        VARCHAR(16)   NOT NULL,  -- open, topup, call, reaper
  uniqueid    VARCHAR(150)  NULL,      -- the call, for call and reaper rows
  created     TEXT          NOT NULL,
  PRIMARY KEY (id)
);

CREATE INDEX IF NOT EXISTS astcreditres_account ON astcreditres (account);
CREATE INDEX IF NOT EXISTS astcdr_account_start ON astcdr (account, start);
CREATE INDEX IF NOT EXISTS astcdr_state ON astcdr (state);
CREATE UNIQUE INDEX IF NOT EXISTS astledger_call ON astledger (uniqueid, kind);
CREATE INDEX IF NOT EXISTS astledger_account ON astledger (account);
