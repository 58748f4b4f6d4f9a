-- Read models folded from DAMM_EVENTS. Derived state: replay rebuilds every row from the log.
CREATE TABLE checkpoint (
    projector  text PRIMARY KEY,
    last_seq   bigint NOT NULL
);

CREATE TABLE tiers (
    tier            text PRIMARY KEY,
    regions         text[] NOT NULL,
    exit_countries  text[] NOT NULL,
    session_limit   integer,
    byte_limit      bigint,
    key_lifetime_s  integer,
    status          text NOT NULL,
    defined_by      text NOT NULL,
    updated_at      timestamptz NOT NULL
);

CREATE TABLE tokens (
    token_id        text PRIMARY KEY,
    token_hash      text NOT NULL UNIQUE,
    tier            text NOT NULL,
    max_uses        integer,
    expires_at      timestamptz,
    uses            integer NOT NULL DEFAULT 0,
    active_sessions integer NOT NULL DEFAULT 0,
    revoked         boolean NOT NULL DEFAULT false,
    revoked_reason  text,
    issued_by       text NOT NULL,
    issued_at       timestamptz NOT NULL
);

CREATE TABLE gateways (
    gateway_id     text PRIMARY KEY,
    region         text NOT NULL,
    token_hash     text NOT NULL,
    public_key     text,
    listen_port    integer,
    agent_version  text,
    registered_at  timestamptz,
    active         boolean NOT NULL DEFAULT true,
    status_reason  text,
    added_at       timestamptz NOT NULL
);

CREATE TABLE front_doors (
    gateway_id     text NOT NULL,
    front_door_id  text NOT NULL,
    endpoint       text NOT NULL,
    transport      text NOT NULL,
    priority       integer NOT NULL,
    active         boolean NOT NULL,
    PRIMARY KEY (gateway_id, front_door_id)
);

CREATE TABLE egress_pools (
    pool_id    text PRIMARY KEY,
    provider   text NOT NULL,
    region     text NOT NULL,
    countries  text[] NOT NULL,
    ips        text[] NOT NULL,
    load       double precision NOT NULL,
    headroom   double precision NOT NULL,
    active     boolean NOT NULL
);

CREATE TABLE addresses (
    pool       text NOT NULL,
    idx        integer NOT NULL,
    address    text NOT NULL,
    address6   text,
    device_id  text NOT NULL,
    PRIMARY KEY (pool, idx)
);

CREATE TABLE devices (
    device_id       text PRIMARY KEY,
    public_key      text NOT NULL,
    token_id        text NOT NULL,
    tier            text NOT NULL,
    gateway_id      text NOT NULL,
    front_door_id   text NOT NULL,
    egress_pool_id  text,
    address         text NOT NULL,
    address6        text,
    region          text NOT NULL,
    exit_country    text,
    status          text NOT NULL,
    status_reason   text,
    key_expires_at  timestamptz,
    enrolled_at     timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX devices_gateway ON devices (gateway_id);
CREATE INDEX devices_tier ON devices (tier);

CREATE TABLE usage_totals (
    device_id  text NOT NULL,
    period     text NOT NULL,
    rx_bytes   bigint NOT NULL,
    tx_bytes   bigint NOT NULL,
    PRIMARY KEY (device_id, period)
);

CREATE TABLE catalogs (
    region      text PRIMARY KEY,
    version     bigint NOT NULL,
    key_id      text NOT NULL,
    digest      text NOT NULL,
    expires_at  timestamptz
);

CREATE TABLE signing_keys (
    key_id      text PRIMARY KEY,
    public_key  text NOT NULL,
    announced_at timestamptz NOT NULL
);

-- Telemetry (age-limited stream): not part of replay verification.
CREATE TABLE gateway_health (
    gateway_id     text PRIMARY KEY,
    last_heartbeat timestamptz NOT NULL,
    peer_count     integer NOT NULL,
    active_peers   integer NOT NULL,
    rx_bytes       bigint NOT NULL,
    tx_bytes       bigint NOT NULL,
    load           double precision NOT NULL,
    peer_set_revision bigint NOT NULL
);
