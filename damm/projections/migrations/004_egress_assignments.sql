-- Egress in the packet plane: the address each device leaves from, and a pool's capacity per
-- address, from which the report computes load (the typed load/headroom columns are unused).
ALTER TABLE egress_pools ADD COLUMN devices_per_address integer NOT NULL DEFAULT 128;
ALTER TABLE devices ADD COLUMN egress_address text;
ALTER TABLE egress_pools ADD COLUMN transfer_per_address bigint;
