-- `admin report` lists the devices that moved the most bytes this period: an index in that
-- order makes it a walk of the first rows instead of a sort of every device's total.
CREATE INDEX usage_totals_used ON usage_totals (period, (rx_bytes + tx_bytes) DESC, device_id);
