-- Monthly revenue reports scan one month of revenue transactions.
CREATE INDEX transactions_revenue_by_date ON transactions (created_at) WHERE kind = 'revenue';
