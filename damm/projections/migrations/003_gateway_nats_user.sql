-- Each gateway logs in to NATS as its own user; the config needs the bcrypt hash of its token.
ALTER TABLE gateways ADD COLUMN nats_password_bcrypt text;
