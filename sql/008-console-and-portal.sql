-- Version 8: logins to the operator console and the customer portal.
-- A customer logs in to their own account with a password the operator
-- sets (astbill-admin account password), kept as a salted scrypt hash;
-- NULL: the account has no portal login.
ALTER TABLE astaccount ADD COLUMN password_hash VARCHAR(255) NULL;

-- A browser's session, staff user's or customer's: only the SHA-256 of
-- the cookie is kept, so a copy of the database logs no one in.  It ends
-- at logout, or at ``expires`` whatever happens.
CREATE TABLE astsession (
  session_hash  CHAR(64)      NOT NULL,  -- hex SHA-256 of the cookie
  kind          VARCHAR(16)   NOT NULL,  -- user (astuser) or account (astaccount)
  name          VARCHAR(80)   NOT NULL,  -- the user's or the account's name
  csrf          VARCHAR(64)   NOT NULL,  -- what every form of the session must send back
  expires       {time}        NOT NULL,
  PRIMARY KEY (session_hash)
) {table};

CREATE INDEX astsession_expires ON astsession (expires);

-- The console's figures (calls, answered, minutes, revenue, buy cost and
-- margin by hour, day and trunk) read from the index alone: the days shown
-- are a range of it, and no row is fetched (MariaDB, 80,000 CDRs of a
-- month among 1,000,000: 5 s fetching each row, 0.15 s from the index).
CREATE INDEX astcdr_figures ON astcdr (start, trunk, disposition, billsec, cost, buy_cost);

--@ mysql
ALTER TABLE astsession MODIFY name VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
