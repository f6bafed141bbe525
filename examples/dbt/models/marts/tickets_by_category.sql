-- Downstream of overnight: the enriched tickets by category and channel, with how sure the
-- model was (its mean confidence) and how many it was unsure about.
select
    e.category,
    t.channel,
    count(*) as tickets,
    round(avg(e.confidence), 3) as mean_confidence,
    sum(case when e.confidence < 0.5 then 1 else 0 end) as unsure
from {{ ref('stg_tickets') }} as t
join {{ source('overnight', 'tickets_enriched') }} as e using (ticket_id)
group by e.category, t.channel
order by e.category, t.channel
