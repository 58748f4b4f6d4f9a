-- Where a device is now (its own failover reports move it) and which catalog keys it trusts.
ALTER TABLE devices ADD COLUMN front_door_reported_at timestamptz;
ALTER TABLE devices ADD COLUMN pinned_keys text[] NOT NULL DEFAULT '{}';
