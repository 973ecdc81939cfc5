-- The double-entry ledger. Every money movement is one row in `transactions` and two or more rows
-- in `entries` whose amounts sum to zero. User accounts cache their balance (the sum of their
-- entries) and may never go negative. System accounts (the outside world, the company's revenue)
-- do not cache a balance: every deposit touches the world account, and a cached balance there
-- would make one row every transaction has to update. Their balance is the sum of their entries.

CREATE TABLE accounts (
    account_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL for system accounts.
    user_id    bigint CHECK (user_id > 0),
    currency   text NOT NULL REFERENCES currencies (code),
    kind       text NOT NULL CHECK (kind IN ('regular', 'reserve', 'world', 'revenue')),
    balance    bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_owner_matches_kind
        CHECK ((kind IN ('regular', 'reserve')) = (user_id IS NOT NULL)),
    CONSTRAINT accounts_user_balance_not_negative
        CHECK (user_id IS NULL OR balance >= 0),
    CONSTRAINT accounts_system_balance_not_cached
        CHECK (user_id IS NOT NULL OR balance = 0),
    CONSTRAINT accounts_owner_unique UNIQUE NULLS NOT DISTINCT (user_id, currency, kind)
);

-- One world and one revenue account per currency.
INSERT INTO accounts (user_id, currency, kind)
SELECT NULL, code, kind FROM currencies CROSS JOIN (VALUES ('world'), ('revenue')) AS system (kind);

-- Services that orders are placed for; the name is shown in revenue reports.
CREATE TABLE services (
    service_id bigint PRIMARY KEY CHECK (service_id > 0),
    name       text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE transactions (
    -- Random (v4) UUIDs: a sequence would make every writer touch the same last index page,
    -- which serializable conflict detection reports as conflicts.
    transaction_id  uuid PRIMARY KEY,
    kind            text NOT NULL
        CHECK (kind IN ('deposit', 'withdrawal', 'transfer', 'reserve', 'release', 'revenue')),
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        text NOT NULL REFERENCES currencies (code),
    created_at      timestamptz NOT NULL DEFAULT now(),
    description     text NOT NULL,
    from_user_id    bigint CHECK (from_user_id > 0),
    to_user_id      bigint CHECK (to_user_id > 0),
    order_id        bigint CHECK (order_id > 0),
    service_id      bigint CHECK (service_id > 0),
    idempotency_key text,
    -- The caller's free text: a deposit's source, a withdrawal's destination, a transfer's comment.
    memo            text NOT NULL DEFAULT '',
    CONSTRAINT transactions_users_match_kind CHECK (
        CASE kind
            WHEN 'deposit' THEN from_user_id IS NULL AND to_user_id IS NOT NULL
            WHEN 'withdrawal' THEN from_user_id IS NOT NULL AND to_user_id IS NULL
            WHEN 'transfer' THEN from_user_id IS NOT NULL AND to_user_id IS NOT NULL
                AND from_user_id <> to_user_id
            WHEN 'revenue' THEN from_user_id IS NOT NULL AND to_user_id IS NULL
            ELSE from_user_id IS NOT NULL AND to_user_id = from_user_id
        END
    ),
    CONSTRAINT transactions_order_matches_kind
        CHECK ((kind IN ('reserve', 'release', 'revenue')) = (order_id IS NOT NULL AND service_id IS NOT NULL))
);

-- History of a user: transactions where the user is either side, in both sort orders. Listing
-- reads the two sides as two ordered index scans and merges them (keyset pagination, no OFFSET).
CREATE INDEX transactions_from_user_by_date ON transactions (from_user_id, created_at, transaction_id)
    WHERE from_user_id IS NOT NULL;
CREATE INDEX transactions_to_user_by_date ON transactions (to_user_id, created_at, transaction_id)
    WHERE to_user_id IS NOT NULL;
CREATE INDEX transactions_from_user_by_amount ON transactions (from_user_id, amount, transaction_id)
    WHERE from_user_id IS NOT NULL;
CREATE INDEX transactions_to_user_by_amount ON transactions (to_user_id, amount, transaction_id)
    WHERE to_user_id IS NOT NULL;

CREATE TABLE entries (
    transaction_id uuid NOT NULL REFERENCES transactions (transaction_id),
    account_id     bigint NOT NULL REFERENCES accounts (account_id),
    -- Positive credits the account, negative debits it.
    amount         bigint NOT NULL CHECK (amount <> 0),
    -- The account's balance right after this entry (user accounts only).
    balance_after  bigint CHECK (balance_after >= 0),
    PRIMARY KEY (transaction_id, account_id)
);

CREATE TABLE orders (
    order_id               bigint PRIMARY KEY CHECK (order_id > 0),
    user_id                bigint NOT NULL CHECK (user_id > 0),
    -- Deferred: the order row is written first (it is the reserve's idempotency key), the
    -- service row right after it in the same transaction.
    service_id             bigint NOT NULL REFERENCES services (service_id) DEFERRABLE INITIALLY DEFERRED,
    service_name           text NOT NULL DEFAULT '',
    currency               text NOT NULL REFERENCES currencies (code),
    status                 text NOT NULL CHECK (status IN ('reserved', 'captured', 'released')),
    reserved_amount        bigint NOT NULL CHECK (reserved_amount > 0),
    captured_amount        bigint NOT NULL DEFAULT 0 CHECK (captured_amount >= 0),
    released_amount        bigint NOT NULL DEFAULT 0 CHECK (released_amount >= 0),
    reserve_transaction_id uuid NOT NULL REFERENCES transactions (transaction_id) DEFERRABLE INITIALLY DEFERRED,
    final_transaction_id   uuid REFERENCES transactions (transaction_id) DEFERRABLE INITIALLY DEFERRED,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT orders_money_accounted_for CHECK (
        CASE status
            WHEN 'reserved' THEN captured_amount = 0 AND released_amount = 0
            WHEN 'captured' THEN captured_amount > 0 AND captured_amount + released_amount = reserved_amount
            ELSE captured_amount = 0 AND released_amount = reserved_amount
        END
    ),
    CONSTRAINT orders_final_transaction_matches_status
        CHECK ((status = 'reserved') = (final_transaction_id IS NULL))
);

CREATE TABLE idempotency_keys (
    idempotency_key text PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    -- The normalized request, to tell a replay from a different request under the same key.
    request         jsonb NOT NULL,
    -- Exactly one outcome: the transaction written, or the business reason it was refused.
    transaction_id  uuid REFERENCES transactions (transaction_id) DEFERRABLE INITIALLY DEFERRED,
    error_reason    text,
    error_metadata  jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_one_outcome CHECK ((transaction_id IS NULL) <> (error_reason IS NULL))
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- Entries of each INSERT statement must sum to zero per transaction; the operations write all
-- entries of a transaction in one statement, so every transaction is balanced.
CREATE FUNCTION entries_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced uuid;
BEGIN
    SELECT transaction_id INTO unbalanced
    FROM new_entries GROUP BY transaction_id HAVING sum(amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'entries of transaction % do not sum to zero', unbalanced
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER entries_balanced AFTER INSERT ON entries
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION entries_check_balanced();

-- The books are append-only: a written transaction or entry is never changed or removed.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are append-only', TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER transactions_append_only BEFORE UPDATE OR DELETE ON transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
