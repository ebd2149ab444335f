-- Version 6: account names match exactly on every backend.  SQLite compares
-- text byte for byte; MySQL's default collation took 'ACC1' and 'acc1 ' for
-- 'acc1'.  On MySQL the account columns get a binary collation that counts
-- trailing spaces ({exact}: utf8mb4_nopad_bin on MariaDB, utf8mb4_0900_bin
-- on MySQL 8).  Each statement rebuilds its table: on a large astcdr, it
-- takes a while.
--@ mysql
ALTER TABLE astaccount MODIFY account VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
--@ mysql
ALTER TABLE astcreditres MODIFY account VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
--@ mysql
ALTER TABLE astcdr MODIFY account VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
--@ mysql
ALTER TABLE astledger MODIFY account VARCHAR(80) CHARACTER SET utf8mb4 COLLATE {exact} NOT NULL;
