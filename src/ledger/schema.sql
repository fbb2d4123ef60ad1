-- The round on PostgreSQL (SERVER_DATABASE_URL). lottery-server runs this whole file at start-up
-- when any relation it creates is missing (an administrator may run it instead, and give the
-- server's role only SELECT, INSERT and UPDATE), inside one transaction holding an advisory lock
-- (so that replicas starting at the same instant do not race each other's CREATE): every
-- statement must stay idempotent. A later version migrates by adding statements such as
-- ALTER TABLE ... ADD COLUMN IF NOT EXISTS, and a relation to RELATIONS in postgres.rs.

-- The round itself: one row. Its row lock is what makes the draw happen exactly once: every
-- draw takes it (SELECT ... FOR UPDATE) before it looks for an agency not done.
CREATE TABLE IF NOT EXISTS lottery_round (
    id       smallint    PRIMARY KEY CHECK (id = 1),
    agencies integer     NOT NULL CHECK (agencies > 0),
    drawn    boolean     NOT NULL DEFAULT false,
    drawn_at timestamptz
);

-- One row per agency: how many bets it holds (where it resumes), whether it said DONE, and its
-- winners once drawn (documents joined by commas, in file order). A batch locks its agency's
-- row, so two sessions of one agency (a stale one on another replica) take turns.
CREATE TABLE IF NOT EXISTS lottery_agency (
    agency  integer PRIMARY KEY CHECK (agency > 0),
    stored  bigint  NOT NULL DEFAULT 0 CHECK (stored >= 0),
    done    boolean NOT NULL DEFAULT false,
    winners text    NOT NULL DEFAULT ''
);

-- Every bet, keyed by (agency, seq): seq is the bet's position in its agency's file, from 0, so
-- a bet can never be stored twice.
CREATE TABLE IF NOT EXISTS lottery_bet (
    agency     integer  NOT NULL,
    seq        bigint   NOT NULL,
    first_name text     NOT NULL,
    last_name  text     NOT NULL,
    document   text     NOT NULL,
    birthdate  date     NOT NULL,
    number     smallint NOT NULL CHECK (number BETWEEN 0 AND 9999),
    PRIMARY KEY (agency, seq)
);

-- The agencies not done yet: every DONE asks whether any is left, and with this index that is
-- one probe whatever the number of agencies.
CREATE INDEX IF NOT EXISTS lottery_agency_not_done ON lottery_agency (agency) WHERE NOT done;
