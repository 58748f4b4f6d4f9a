-- Catalog signing keys: when a key started signing and when it stopped.
ALTER TABLE signing_keys ADD COLUMN activated_at timestamptz;
ALTER TABLE signing_keys ADD COLUMN retired_at timestamptz;
