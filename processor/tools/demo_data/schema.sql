-- The demo's tables. Idempotent: safe to run on every start.
CREATE SCHEMA IF NOT EXISTS demo;
CREATE TABLE IF NOT EXISTS demo.account (
    id      integer PRIMARY KEY,
    name    text NOT NULL,
    balance numeric(12, 2) NOT NULL DEFAULT 0 CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS demo.item (
    sku     text PRIMARY KEY,
    qty     integer NOT NULL CHECK (qty >= 0),
    version bigint NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS demo.note (
    id   integer PRIMARY KEY,
    body text NOT NULL
);
INSERT INTO demo.account (id, name, balance)
    SELECT g, 'account ' || g, 100 FROM generate_series(1, 100) AS g
    ON CONFLICT (id) DO NOTHING;
INSERT INTO demo.item (sku, qty) VALUES ('widget', 10), ('gadget', 5)
    ON CONFLICT (sku) DO NOTHING;
INSERT INTO demo.note (id, body) VALUES (1, 'hello') ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS demo.counter (
    id integer PRIMARY KEY,
    n  bigint NOT NULL DEFAULT 0
);
