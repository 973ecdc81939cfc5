-- Every money operation is one function call: one round trip to PostgreSQL, one SERIALIZABLE
-- transaction (the connection's default isolation level). Business refusals are returned as a
-- result with error_reason set, not raised, so that a refusal made under an idempotency key is
-- committed with the key and a retry gets the same answer.

CREATE TYPE operation_result AS (
    error_reason       text,
    error_metadata     jsonb,
    replayed           boolean,
    transaction_id     uuid,
    kind               text,
    amount             bigint,
    currency           text,
    created_at         timestamptz,
    description        text,
    from_user_id       bigint,
    to_user_id         bigint,
    order_id           bigint,
    service_id         bigint,
    idempotency_key    text,
    account_user_id    bigint,
    regular_balance    bigint,
    regular_updated_at timestamptz,
    reserve_balance    bigint,
    reserve_updated_at timestamptz
);

-- "199.99" for 19999 minor units of a currency with two minor digits.
CREATE FUNCTION format_money(p_amount bigint, p_currency text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT round(p_amount::numeric / power(10::numeric, c.minor_digits), c.minor_digits)::text
    FROM currencies c WHERE c.code = p_currency
$$;

CREATE FUNCTION system_account(p_currency text, p_kind text) RETURNS bigint
LANGUAGE sql STABLE STRICT AS $$
    SELECT account_id FROM accounts WHERE user_id IS NULL AND currency = p_currency AND kind = p_kind
$$;

CREATE FUNCTION operation_error(p_reason text, p_metadata jsonb, p_replayed boolean DEFAULT false)
RETURNS operation_result LANGUAGE sql IMMUTABLE AS $$
    SELECT ROW(p_reason, p_metadata, p_replayed, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::operation_result
$$;

-- The transaction and the user's two accounts in its currency, as they are now.
CREATE FUNCTION operation_success(p_transaction_id uuid, p_user_id bigint, p_replayed boolean)
RETURNS operation_result LANGUAGE sql AS $$
    SELECT ROW(NULL, NULL, p_replayed, t.transaction_id, t.kind, t.amount, t.currency, t.created_at,
               t.description, t.from_user_id, t.to_user_id, t.order_id, t.service_id,
               t.idempotency_key, p_user_id, regular.balance, regular.updated_at, reserve.balance,
               reserve.updated_at)::operation_result
    FROM transactions t
    LEFT JOIN accounts regular
        ON regular.user_id = p_user_id AND regular.currency = t.currency AND regular.kind = 'regular'
    LEFT JOIN accounts reserve
        ON reserve.user_id = p_user_id AND reserve.currency = t.currency AND reserve.kind = 'reserve'
    WHERE t.transaction_id = p_transaction_id
$$;

-- Claims an idempotency key for a new operation whose transaction will be p_transaction_id.
-- INSERT ... ON CONFLICT rather than a lookup first: a lookup of a missing key takes a predicate
-- lock on an index range that concurrent inserts of other keys would collide with.
CREATE FUNCTION idempotency_claim(p_key text, p_request jsonb, p_transaction_id uuid)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO idempotency_keys (idempotency_key, request, transaction_id)
    VALUES (p_key, p_request, p_transaction_id)
    ON CONFLICT (idempotency_key) DO NOTHING;
    RETURN FOUND;
END;
$$;

-- The outcome recorded under a key that was claimed before: the same request gets it again,
-- a different request is refused.
CREATE FUNCTION idempotency_replay(p_key text, p_request jsonb) RETURNS operation_result
LANGUAGE plpgsql AS $$
DECLARE
    claimed idempotency_keys;
    affected_user bigint;
BEGIN
    SELECT * INTO STRICT claimed FROM idempotency_keys WHERE idempotency_key = p_key;
    IF claimed.request <> p_request THEN
        RETURN operation_error('IDEMPOTENCY_KEY_REUSED', jsonb_build_object('idempotency_key', p_key));
    END IF;
    IF claimed.error_reason IS NOT NULL THEN
        RETURN operation_error(claimed.error_reason, claimed.error_metadata, true);
    END IF;
    SELECT coalesce(from_user_id, to_user_id) INTO STRICT affected_user
    FROM transactions WHERE transaction_id = claimed.transaction_id;
    RETURN operation_success(claimed.transaction_id, affected_user, true);
END;
$$;

-- A business refusal, remembered under the key (if any) so that a retry gets it again.
CREATE FUNCTION idempotency_refuse(p_key text, p_reason text, p_metadata jsonb)
RETURNS operation_result LANGUAGE plpgsql AS $$
BEGIN
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_keys
        SET transaction_id = NULL, error_reason = p_reason, error_metadata = p_metadata
        WHERE idempotency_key = p_key;
    END IF;
    RETURN operation_error(p_reason, p_metadata);
END;
$$;

-- Debits a user's regular account if it holds enough; NULL account when it does not.
-- Returns the refusal (ACCOUNT_NOT_FOUND or INSUFFICIENT_FUNDS) in reason.
CREATE FUNCTION debit_regular(p_user_id bigint, p_currency text, p_amount bigint,
                              OUT account_id bigint, OUT balance_after bigint,
                              OUT reason text, OUT metadata jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    available bigint;
BEGIN
    UPDATE accounts a SET balance = a.balance - p_amount, updated_at = now()
    WHERE a.user_id = p_user_id AND a.currency = p_currency AND a.kind = 'regular'
      AND a.balance >= p_amount
    RETURNING a.account_id, a.balance INTO account_id, balance_after;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT a.balance INTO available FROM accounts a
    WHERE a.user_id = p_user_id AND a.currency = p_currency AND a.kind = 'regular';
    IF NOT FOUND THEN
        reason := 'ACCOUNT_NOT_FOUND';
        metadata := jsonb_build_object('user_id', p_user_id::text, 'currency', p_currency);
    ELSE
        reason := 'INSUFFICIENT_FUNDS';
        metadata := jsonb_build_object('user_id', p_user_id::text, 'currency', p_currency,
                                       'available', format_money(available, p_currency),
                                       'requested', format_money(p_amount, p_currency));
    END IF;
END;
$$;

-- Credits a user's regular account, creating both of the user's accounts in that currency on
-- the first credit.
CREATE FUNCTION credit_regular(p_user_id bigint, p_currency text, p_amount bigint,
                               OUT account_id bigint, OUT balance_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    created integer;
BEGIN
    UPDATE accounts a SET balance = a.balance + p_amount, updated_at = now()
    WHERE a.user_id = p_user_id AND a.currency = p_currency AND a.kind = 'regular'
    RETURNING a.account_id, a.balance INTO account_id, balance_after;
    IF FOUND THEN
        RETURN;
    END IF;
    INSERT INTO accounts (user_id, currency, kind, balance)
    VALUES (p_user_id, p_currency, 'regular', p_amount), (p_user_id, p_currency, 'reserve', 0)
    ON CONFLICT (user_id, currency, kind) DO NOTHING;
    GET DIAGNOSTICS created = ROW_COUNT;
    IF created <> 2 THEN
        -- A concurrent first credit created the accounts after this transaction's snapshot.
        RAISE EXCEPTION 'accounts of user % in % were created concurrently', p_user_id, p_currency
            USING ERRCODE = 'serialization_failure';
    END IF;
    SELECT a.account_id, a.balance INTO STRICT account_id, balance_after FROM accounts a
    WHERE a.user_id = p_user_id AND a.currency = p_currency AND a.kind = 'regular';
END;
$$;

-- Moves money between a user's own accounts (regular <-> reserve); both must exist.
CREATE FUNCTION move_within_user(p_user_id bigint, p_currency text, p_source_kind text,
                                 p_amount bigint, OUT source_account bigint,
                                 OUT source_balance bigint, OUT target_account bigint,
                                 OUT target_balance bigint)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts a SET balance = a.balance - p_amount, updated_at = now()
    WHERE a.user_id = p_user_id AND a.currency = p_currency AND a.kind = p_source_kind
    RETURNING a.account_id, a.balance INTO STRICT source_account, source_balance;
    UPDATE accounts a SET balance = a.balance + p_amount, updated_at = now()
    WHERE a.user_id = p_user_id AND a.currency = p_currency
      AND a.kind = CASE p_source_kind WHEN 'regular' THEN 'reserve' ELSE 'regular' END
    RETURNING a.account_id, a.balance INTO STRICT target_account, target_balance;
END;
$$;

CREATE FUNCTION balance_deposit(p_user_id bigint, p_currency text, p_amount bigint,
                                p_source text, p_idempotency_key text)
RETURNS operation_result LANGUAGE plpgsql AS $$
DECLARE
    request jsonb := jsonb_build_object('operation', 'deposit', 'user_id', p_user_id,
        'currency', p_currency, 'amount', p_amount, 'source', p_source);
    new_transaction uuid := gen_random_uuid();
    credited record;
BEGIN
    IF p_idempotency_key IS NOT NULL
       AND NOT idempotency_claim(p_idempotency_key, request, new_transaction) THEN
        RETURN idempotency_replay(p_idempotency_key, request);
    END IF;
    credited := credit_regular(p_user_id, p_currency, p_amount);
    INSERT INTO transactions (transaction_id, kind, amount, currency, description, to_user_id,
                              idempotency_key, memo)
    VALUES (new_transaction, 'deposit', p_amount, p_currency,
            format('Deposit of %s %s to user %s from %s.', format_money(p_amount, p_currency),
                   p_currency, p_user_id,
                   CASE WHEN p_source = '' THEN 'an external payment'
                        ELSE format('payment source ''%s''', p_source) END),
            p_user_id, p_idempotency_key, p_source);
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    VALUES (new_transaction, system_account(p_currency, 'world'), -p_amount, NULL),
           (new_transaction, credited.account_id, p_amount, credited.balance_after);
    RETURN operation_success(new_transaction, p_user_id, false);
END;
$$;

CREATE FUNCTION balance_withdraw(p_user_id bigint, p_currency text, p_amount bigint,
                                 p_destination text, p_idempotency_key text)
RETURNS operation_result LANGUAGE plpgsql AS $$
DECLARE
    request jsonb := jsonb_build_object('operation', 'withdraw', 'user_id', p_user_id,
        'currency', p_currency, 'amount', p_amount, 'destination', p_destination);
    new_transaction uuid := gen_random_uuid();
    debited record;
BEGIN
    IF p_idempotency_key IS NOT NULL
       AND NOT idempotency_claim(p_idempotency_key, request, new_transaction) THEN
        RETURN idempotency_replay(p_idempotency_key, request);
    END IF;
    debited := debit_regular(p_user_id, p_currency, p_amount);
    IF debited.reason IS NOT NULL THEN
        RETURN idempotency_refuse(p_idempotency_key, debited.reason, debited.metadata);
    END IF;
    INSERT INTO transactions (transaction_id, kind, amount, currency, description, from_user_id,
                              idempotency_key, memo)
    VALUES (new_transaction, 'withdrawal', p_amount, p_currency,
            format('Withdrawal of %s %s from user %s to %s.', format_money(p_amount, p_currency),
                   p_currency, p_user_id,
                   CASE WHEN p_destination = '' THEN 'an external account'
                        ELSE format('payout destination ''%s''', p_destination) END),
            p_user_id, p_idempotency_key, p_destination);
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    VALUES (new_transaction, debited.account_id, -p_amount, debited.balance_after),
           (new_transaction, system_account(p_currency, 'world'), p_amount, NULL);
    RETURN operation_success(new_transaction, p_user_id, false);
END;
$$;

CREATE FUNCTION balance_transfer(p_from_user_id bigint, p_to_user_id bigint, p_currency text,
                                 p_amount bigint, p_comment text, p_idempotency_key text)
RETURNS operation_result LANGUAGE plpgsql AS $$
DECLARE
    request jsonb := jsonb_build_object('operation', 'transfer', 'from_user_id', p_from_user_id,
        'to_user_id', p_to_user_id, 'currency', p_currency, 'amount', p_amount,
        'comment', p_comment);
    new_transaction uuid := gen_random_uuid();
    debited record;
    credited record;
BEGIN
    IF p_idempotency_key IS NOT NULL
       AND NOT idempotency_claim(p_idempotency_key, request, new_transaction) THEN
        RETURN idempotency_replay(p_idempotency_key, request);
    END IF;
    debited := debit_regular(p_from_user_id, p_currency, p_amount);
    IF debited.reason IS NOT NULL THEN
        RETURN idempotency_refuse(p_idempotency_key, debited.reason, debited.metadata);
    END IF;
    credited := credit_regular(p_to_user_id, p_currency, p_amount);
    INSERT INTO transactions (transaction_id, kind, amount, currency, description, from_user_id,
                              to_user_id, idempotency_key, memo)
    VALUES (new_transaction, 'transfer', p_amount, p_currency,
            format('Transfer of %s %s from user %s to user %s%s.',
                   format_money(p_amount, p_currency), p_currency, p_from_user_id, p_to_user_id,
                   CASE WHEN p_comment = '' THEN '' ELSE format(' with comment ''%s''', p_comment) END),
            p_from_user_id, p_to_user_id, p_idempotency_key, p_comment);
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    VALUES (new_transaction, debited.account_id, -p_amount, debited.balance_after),
           (new_transaction, credited.account_id, p_amount, credited.balance_after);
    RETURN operation_success(new_transaction, p_from_user_id, false);
END;
$$;

-- The order id is the reserve's idempotency key. A refused reserve leaves no order behind, so
-- the same order can be reserved once the user has the money.
CREATE FUNCTION balance_reserve(p_user_id bigint, p_service_id bigint, p_order_id bigint,
                                p_currency text, p_amount bigint, p_service_name text)
RETURNS operation_result LANGUAGE plpgsql AS $$
DECLARE
    new_transaction uuid := gen_random_uuid();
    existing orders;
    debited record;
    credited record;
    known_name text;
BEGIN
    INSERT INTO orders (order_id, user_id, service_id, service_name, currency, status,
                        reserved_amount, reserve_transaction_id)
    VALUES (p_order_id, p_user_id, p_service_id, p_service_name, p_currency, 'reserved',
            p_amount, new_transaction)
    ON CONFLICT (order_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT * INTO STRICT existing FROM orders WHERE order_id = p_order_id;
        IF (existing.user_id, existing.service_id, existing.currency, existing.reserved_amount,
            existing.service_name)
           IS DISTINCT FROM (p_user_id, p_service_id, p_currency, p_amount, p_service_name) THEN
            RETURN operation_error('ORDER_ALREADY_EXISTS',
                                   jsonb_build_object('order_id', p_order_id::text));
        END IF;
        RETURN operation_success(existing.reserve_transaction_id, existing.user_id, true);
    END IF;
    debited := debit_regular(p_user_id, p_currency, p_amount);
    IF debited.reason IS NOT NULL THEN
        DELETE FROM orders WHERE order_id = p_order_id;
        RETURN operation_error(debited.reason, debited.metadata);
    END IF;
    UPDATE accounts a SET balance = a.balance + p_amount, updated_at = now()
    WHERE a.user_id = p_user_id AND a.currency = p_currency AND a.kind = 'reserve'
    RETURNING a.account_id, a.balance INTO STRICT credited;
    -- Read before writing: an upsert would lock the service row and queue every reserve of a
    -- popular service behind the one before it.
    SELECT name INTO known_name FROM services WHERE service_id = p_service_id;
    IF NOT FOUND OR (p_service_name <> '' AND known_name IS DISTINCT FROM p_service_name) THEN
        INSERT INTO services (service_id, name) VALUES (p_service_id, nullif(p_service_name, ''))
        ON CONFLICT (service_id) DO UPDATE
            SET name = coalesce(EXCLUDED.name, services.name), updated_at = now();
    END IF;
    INSERT INTO transactions (transaction_id, kind, amount, currency, description, from_user_id,
                              to_user_id, order_id, service_id)
    VALUES (new_transaction, 'reserve', p_amount, p_currency,
            format('Reserved %s %s of user %s for order %s (service %s).',
                   format_money(p_amount, p_currency), p_currency, p_user_id, p_order_id,
                   p_service_id),
            p_user_id, p_user_id, p_order_id, p_service_id);
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    VALUES (new_transaction, debited.account_id, -p_amount, debited.balance_after),
           (new_transaction, credited.account_id, p_amount, credited.balance);
    RETURN operation_success(new_transaction, p_user_id, false);
END;
$$;

CREATE FUNCTION balance_release_reserve(p_order_id bigint) RETURNS operation_result
LANGUAGE plpgsql AS $$
DECLARE
    new_transaction uuid := gen_random_uuid();
    released orders;
    moved record;
BEGIN
    UPDATE orders SET status = 'released', released_amount = reserved_amount,
                      final_transaction_id = new_transaction, updated_at = now()
    WHERE order_id = p_order_id AND status = 'reserved'
    RETURNING * INTO released;
    IF NOT FOUND THEN
        SELECT * INTO released FROM orders WHERE order_id = p_order_id;
        IF NOT FOUND THEN
            RETURN operation_error('ORDER_NOT_FOUND', jsonb_build_object('order_id', p_order_id::text));
        ELSIF released.status = 'released' THEN
            RETURN operation_success(released.final_transaction_id, released.user_id, true);
        END IF;
        RETURN operation_error('ORDER_STATE_CONFLICT', jsonb_build_object(
            'order_id', p_order_id::text, 'status', released.status));
    END IF;
    moved := move_within_user(released.user_id, released.currency, 'reserve', released.reserved_amount);
    INSERT INTO transactions (transaction_id, kind, amount, currency, description, from_user_id,
                              to_user_id, order_id, service_id)
    VALUES (new_transaction, 'release', released.reserved_amount, released.currency,
            format('Released %s %s of order %s (service %s) back to user %s: the order was cancelled.',
                   format_money(released.reserved_amount, released.currency), released.currency,
                   p_order_id, released.service_id, released.user_id),
            released.user_id, released.user_id, p_order_id, released.service_id);
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    VALUES (new_transaction, moved.source_account, -released.reserved_amount, moved.source_balance),
           (new_transaction, moved.target_account, released.reserved_amount, moved.target_balance);
    RETURN operation_success(new_transaction, released.user_id, false);
END;
$$;

-- p_amount is the caller's decimal (NULL: all that is reserved); its precision is checked here
-- because only the order knows its currency.
CREATE FUNCTION balance_recognize_revenue(p_user_id bigint, p_service_id bigint,
                                          p_order_id bigint, p_amount numeric)
RETURNS operation_result LANGUAGE plpgsql AS $$
DECLARE
    revenue_transaction uuid := gen_random_uuid();
    rest_transaction uuid := gen_random_uuid();
    ordered orders;
    scaled numeric;
    captured bigint;
    rest bigint;
    reserve_account bigint;
    reserve_after bigint;
    regular_account bigint;
    regular_after bigint;
BEGIN
    SELECT * INTO ordered FROM orders WHERE order_id = p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN operation_error('ORDER_NOT_FOUND', jsonb_build_object('order_id', p_order_id::text));
    END IF;
    IF (ordered.user_id, ordered.service_id) <> (p_user_id, p_service_id) THEN
        RETURN operation_error('ORDER_MISMATCH', jsonb_build_object('order_id', p_order_id::text));
    END IF;
    IF p_amount IS NULL THEN
        captured := ordered.reserved_amount;
    ELSE
        scaled := p_amount * power(10::numeric,
            (SELECT minor_digits FROM currencies WHERE code = ordered.currency));
        IF scaled <> trunc(scaled) THEN
            RETURN operation_error('AMOUNT_TOO_PRECISE', jsonb_build_object(
                'order_id', p_order_id::text, 'currency', ordered.currency));
        END IF;
        IF scaled > ordered.reserved_amount THEN
            RETURN operation_error('AMOUNT_EXCEEDS_RESERVE', jsonb_build_object(
                'order_id', p_order_id::text,
                'reserved', format_money(ordered.reserved_amount, ordered.currency)));
        END IF;
        captured := scaled::bigint;
    END IF;
    IF ordered.status = 'captured' AND ordered.captured_amount = captured THEN
        RETURN operation_success(ordered.final_transaction_id, ordered.user_id, true);
    ELSIF ordered.status <> 'reserved' THEN
        RETURN operation_error('ORDER_STATE_CONFLICT', jsonb_build_object(
            'order_id', p_order_id::text, 'status', ordered.status));
    END IF;
    rest := ordered.reserved_amount - captured;
    UPDATE orders SET status = 'captured', captured_amount = captured, released_amount = rest,
                      final_transaction_id = revenue_transaction, updated_at = now()
    WHERE order_id = p_order_id;
    UPDATE accounts a SET balance = a.balance - ordered.reserved_amount, updated_at = now()
    WHERE a.user_id = ordered.user_id AND a.currency = ordered.currency AND a.kind = 'reserve'
    RETURNING a.account_id, a.balance INTO STRICT reserve_account, reserve_after;
    INSERT INTO transactions (transaction_id, kind, amount, currency, description, from_user_id,
                              order_id, service_id)
    VALUES (revenue_transaction, 'revenue', captured, ordered.currency,
            format('Revenue of %s %s from user %s for order %s (service %s).',
                   format_money(captured, ordered.currency), ordered.currency, ordered.user_id,
                   p_order_id, ordered.service_id),
            ordered.user_id, p_order_id, ordered.service_id);
    IF rest = 0 THEN
        INSERT INTO entries (transaction_id, account_id, amount, balance_after)
        VALUES (revenue_transaction, reserve_account, -captured, reserve_after),
               (revenue_transaction, system_account(ordered.currency, 'revenue'), captured, NULL);
    ELSE
        UPDATE accounts a SET balance = a.balance + rest, updated_at = now()
        WHERE a.user_id = ordered.user_id AND a.currency = ordered.currency AND a.kind = 'regular'
        RETURNING a.account_id, a.balance INTO STRICT regular_account, regular_after;
        INSERT INTO transactions (transaction_id, kind, amount, currency, description,
                                  from_user_id, to_user_id, order_id, service_id)
        VALUES (rest_transaction, 'release', rest, ordered.currency,
                format('Released %s %s of order %s (service %s) back to user %s: the rest after revenue of %s %s.',
                       format_money(rest, ordered.currency), ordered.currency, p_order_id,
                       ordered.service_id, ordered.user_id,
                       format_money(captured, ordered.currency), ordered.currency),
                ordered.user_id, ordered.user_id, p_order_id, ordered.service_id);
        INSERT INTO entries (transaction_id, account_id, amount, balance_after)
        VALUES (revenue_transaction, reserve_account, -captured, reserve_after + rest),
               (revenue_transaction, system_account(ordered.currency, 'revenue'), captured, NULL),
               (rest_transaction, reserve_account, -rest, reserve_after),
               (rest_transaction, regular_account, rest, regular_after);
    END IF;
    RETURN operation_success(revenue_transaction, ordered.user_id, false);
END;
$$;
