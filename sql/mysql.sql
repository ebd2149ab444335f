-- AstBill schema for MySQL / MariaDB (and MariaDB Galera): InnoDB only,
-- a primary key on every table, money in DECIMAL(19,6).
-- Safe to load twice.

CREATE TABLE IF NOT EXISTS astaccount (
  account     VARCHAR(80)   NOT NULL,
  tariff      VARCHAR(40)   NOT NULL,
  balance     DECIMAL(19,6) NOT NULL,
  reserved    DECIMAL(19,6) NOT NULL DEFAULT 0,  -- sum of its calls' max_cost in astcreditres
  created     DATETIME      NOT NULL,
  PRIMARY KEY (account)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- One row per prefix of a tariff; the per-call lookup probes every prefix
-- of the dialled number through the primary key.
CREATE TABLE IF NOT EXISTS astrate (
  tariff      VARCHAR(40)   NOT NULL,
  prefix      VARCHAR(32)   NOT NULL,
  destination VARCHAR(80)   NOT NULL,
  rate        DECIMAL(19,6) NOT NULL,  -- per minute
  connect_fee DECIMAL(19,6) NOT NULL,
  min_secs    INT           NOT NULL,
  increment   INT           NOT NULL,
  PRIMARY KEY (tariff, prefix)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Calls in progress: what each may still cost.
CREATE TABLE IF NOT EXISTS astcreditres (
  uniqueid    VARCHAR(150)  NOT NULL,
  account     VARCHAR(80)   NOT NULL,
  max_cost    DECIMAL(19,6) NOT NULL,
  max_secs    INT           NOT NULL,
  created     DATETIME      NOT NULL,
  PRIMARY KEY (uniqueid),
  KEY astcreditres_account (account)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Asterisk's own CDR columns, then the billing ones.
CREATE TABLE IF NOT EXISTS astcdr (
  uniqueid    VARCHAR(150)  NOT NULL,
  start       DATETIME      NOT NULL,
  answer      DATETIME      NULL,
  end         DATETIME      NULL,
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
  rate        DECIMAL(19,6) NOT NULL,
  connect_fee DECIMAL(19,6) NOT NULL,
  min_secs    INT           NOT NULL,
  increment   INT           NOT NULL,
  max_secs    INT           NOT NULL,
  cost        DECIMAL(19,6) NULL,
  state       VARCHAR(16)   NOT NULL,  -- active, settled, released, charged, late, unbilled
  PRIMARY KEY (uniqueid),
  KEY astcdr_account_start (account, start),
  KEY astcdr_state (state)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Every change of a balance, written in the transaction that makes it.
CREATE TABLE IF NOT EXISTS astledger (
  id          BIGINT        NOT NULL AUTO_INCREMENT,
  account     VARCHAR(80)   NOT NULL,
  amount      DECIMAL(19,6) NOT NULL,  -- signed: + credit, - charge
  kind        VARCHAR(16)   NOT NULL,  -- open, topup, call, reaper
  uniqueid    VARCHAR(150)  NULL,      -- the call, for call and reaper rows
  created     DATETIME      NOT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY astledger_call (uniqueid, kind),
  KEY astledger_account (account)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
