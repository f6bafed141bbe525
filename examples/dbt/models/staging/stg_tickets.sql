-- The input of the overnight job: tickets cleaned up for the model (one row per ticket,
-- whitespace trimmed, empty ones left out).
select
    ticket_id,
    cast(created_at as timestamp) as created_at,
    channel,
    trim(subject) as subject,
    trim(body) as body
from {{ ref('raw_tickets') }}
where coalesce(trim(body), '') <> ''
