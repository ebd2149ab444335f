-- Version 5: a call settles at the prices it was authorized with.  Its CDR
-- names the deck that priced it (the tariff's), the deck of the trunk it
-- was sent to, and those of every trunk it may fail over to (' 12 15 ');
-- NULL in a CDR older than this step (priced, as before, by the deck in
-- force at its start).
ALTER TABLE astcdr ADD COLUMN deck BIGINT NULL;
ALTER TABLE astcdr ADD COLUMN trunk_deck BIGINT NULL;
ALTER TABLE astcdr ADD COLUMN route_decks VARCHAR(255) NULL;

-- Calls still to be settled (up, or swept by policy) keep the decks they
-- were priced by: those in force at their start, which until now no
-- import could replace with another of the same start.
UPDATE astcdr SET deck = (
    SELECT x.id FROM astdeck x WHERE x.kind = 'tariff' AND x.name = astcdr.tariff
    AND x.starts <= astcdr.start ORDER BY x.starts DESC LIMIT 1)
  WHERE state IN ('active', 'released', 'charged');
UPDATE astcdr SET trunk_deck = (
    SELECT x.id FROM astdeck x WHERE x.kind = 'trunk' AND x.name = astcdr.trunk
    AND x.starts <= astcdr.start ORDER BY x.starts DESC LIMIT 1)
  WHERE state IN ('active', 'released', 'charged') AND trunk <> '';

-- A deck imported again with the same start is a new deck (a new id): the
-- calls priced by the one it replaces keep theirs.  Of decks with one
-- start the newest id is in force.
--@ mysql
DROP INDEX astdeck_start ON astdeck;
--@ sqlite
DROP INDEX astdeck_start;
CREATE INDEX astdeck_start ON astdeck (kind, name, starts);
