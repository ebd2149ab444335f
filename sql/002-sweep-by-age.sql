-- Version 2: the sweep reads reservations oldest first, by the database's
-- clock.
CREATE INDEX astcreditres_created ON astcreditres (created);
