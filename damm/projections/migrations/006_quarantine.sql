-- Events a projector could not apply (undecodable, or refused by a column's type): kept aside
-- with the reason so the rest of the log keeps flowing; replay --verify fails while any exist.
CREATE TABLE quarantine (
    projector      text NOT NULL,
    seq            bigint NOT NULL,
    subject        text NOT NULL,
    event_type     text NOT NULL,
    error          text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, seq)
);
