-- AstBill schema, version 1: the first release's tables.
-- Written once for every backend; the store fills in {money} (DECIMAL(19,6)
-- in MySQL, integer millionths in SQLite), {time}, {id} and {table}.

CREATE TABLE astaccount (
  account     VARCHAR(80)   NOT NULL,
  tariff      VARCHAR(40)   NOT NULL,
  balance     {money}       NOT NULL,
  reserved    {money}       NOT NULL DEFAULT 0,  -- sum of its calls' max_cost in astcreditres
  created     {time}        NOT NULL,
  PRIMARY KEY (account)
) {table};

-- One row per prefix of a tariff; the per-call lookup probes every prefix
-- of the dialled number through the primary key.
CREATE TABLE astrate (
  tariff      VARCHAR(40)   NOT NULL,
  prefix      VARCHAR(32)   NOT NULL,
  destination VARCHAR(80)   NOT NULL,
  rate        {money}       NOT NULL,  -- per minute
  connect_fee {money}       NOT NULL,
  min_secs    INT           NOT NULL,
  increment   INT           NOT NULL,
  PRIMARY KEY (tariff, prefix)
) {table};

-- Calls in progress: what each may still cost.
CREATE TABLE astcreditres (
  uniqueid    VARCHAR(150)  NOT NULL,
  account     VARCHAR(80)   NOT NULL,
  max_cost    {money}       NOT NULL,
  max_secs    INT           NOT NULL,
  created     {time}        NOT NULL,  -- the database's clock
  PRIMARY KEY (uniqueid)
) {table};

-- Asterisk's own CDR columns, then the billing ones.
CREATE TABLE astcdr (
  uniqueid    VARCHAR(150)  NOT NULL,
  start       {time}        NOT NULL,
  answer      {time}        NULL,
  end         {time}        NULL,
  clid        VARCHAR(80)   NOT NULL DEFAULT '',
  src         VARCHAR(80)   NOT NULL DEFAULT '',
  dst         VARCHAR(80)   NOT NULL DEFAULT '',
  dcontext    VARCHAR(80)   NOT NULL DEFAULT '',
  channel     VARCHAR(80)   NOT NULL DEFAULT '',
  dstchannel  VARCHAR(80)   NOT NULL DEFAULT '',
  lastapp     VARCHAR(80)   NOT NULL DEFAULT '',
  lastdata    VARCHAR(255)  NOT NULL DEFAULT '',  -- the Dial string, cut for display
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
  rate        {money}       NOT NULL,
  connect_fee {money}       NOT NULL,
  min_secs    INT           NOT NULL,
  increment   INT           NOT NULL,
  max_secs    INT           NOT NULL,
  cost        {money}       NULL,
  state       VARCHAR(16)   NOT NULL,  -- active, settled, released, charged, late, unbilled
  PRIMARY KEY (uniqueid)
) {table};

-- Every change of a balance, written in the transaction that makes it.
CREATE TABLE astledger (
  id          {id},
  account     VARCHAR(80)   NOT NULL,
  amount      {money}       NOT NULL,  -- signed: + credit, - charge
  kind        VARCHAR(16)   NOT NULL,  -- open, topup, call, reaper
  uniqueid    VARCHAR(150)  NULL,      -- the call, for call and reaper rows
  created     {time}        NOT NULL,
  PRIMARY KEY (id)
) {table};

CREATE INDEX astcreditres_account ON astcreditres (account);
CREATE INDEX astcdr_account_start ON astcdr (account, start);
CREATE INDEX astcdr_state ON astcdr (state);
CREATE UNIQUE INDEX astledger_call ON astledger (uniqueid, kind);
CREATE INDEX astledger_account ON astledger (account);
