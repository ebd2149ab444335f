-- Version 4: CDRs are listed by start (and uniqueid, for a stable order)
-- and picked by time (astbill-admin cdr --since/--until); the listing reads
-- them a page at a time, each page found through this index.
CREATE INDEX astcdr_start ON astcdr (start, uniqueid);
