-- Version 3: trunks for least-cost routing, rate decks that start at a
-- given time and price by time of day and day of week, postpaid credit
-- limits and call caps.

CREATE TABLE asttrunk (
  name        VARCHAR(40)   NOT NULL,
  dial        VARCHAR(255)  NOT NULL,  -- Dial template with {number}
  enabled     INT           NOT NULL DEFAULT 1,
  created     {time}        NOT NULL,
  PRIMARY KEY (name)
) {table};

-- A deck: the rates of a tariff (what callers pay) or of a trunk (what the
-- carrier charges) from ``starts`` on, until a later deck of the same
-- owner starts.
CREATE TABLE astdeck (
  id          {id},
  kind        VARCHAR(8)    NOT NULL,  -- tariff, trunk
  name        VARCHAR(40)   NOT NULL,
  starts      {time}        NOT NULL,
  created     {time}        NOT NULL,
  PRIMARY KEY (id)
) {table};

CREATE UNIQUE INDEX astdeck_start ON astdeck (kind, name, starts);

-- A deck's rates: per prefix, one row per period (days and hours, in the
-- configured timezone); a prefix's periods cover the week exactly once.
CREATE TABLE astprice (
  deck        BIGINT        NOT NULL,
  prefix      VARCHAR(32)   NOT NULL,
  days        INT           NOT NULL,  -- bitmask, Monday = 1 ... Sunday = 64
  start_min   INT           NOT NULL,  -- minutes after midnight
  end_min     INT           NOT NULL,
  destination VARCHAR(80)   NOT NULL,
  rate        {money}       NOT NULL,  -- per minute
  connect_fee {money}       NOT NULL,
  min_secs    INT           NOT NULL,
  increment   INT           NOT NULL,
  PRIMARY KEY (deck, prefix, days, start_min)
) {table};

-- Each tariff's rates become its first deck, in force since always.
INSERT INTO astdeck (kind, name, starts, created)
  SELECT DISTINCT 'tariff', tariff, '1970-01-01 00:00:00', {now} FROM astrate;
INSERT INTO astprice (deck, prefix, days, start_min, end_min, destination, rate,
                      connect_fee, min_secs, increment)
  SELECT d.id, r.prefix, 127, 0, 1440, r.destination, r.rate, r.connect_fee, r.min_secs,
         r.increment
  FROM astrate r JOIN astdeck d ON d.kind = 'tariff' AND d.name = r.tariff;
DROP TABLE astrate;

-- Postpaid: the balance may go down to minus credit_limit; max_calls caps
-- the calls in progress (0: no cap).
ALTER TABLE astaccount ADD COLUMN credit_limit {money} NOT NULL DEFAULT 0;
ALTER TABLE astaccount ADD COLUMN max_calls INT NOT NULL DEFAULT 0;

-- The trunk that carried the call, and what it charged for it.
ALTER TABLE astcdr ADD COLUMN trunk VARCHAR(40) NOT NULL DEFAULT '';
ALTER TABLE astcdr ADD COLUMN buy_cost {money} NULL;
