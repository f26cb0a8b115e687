-- Split clients that were wrongly merged across businesses by a masked or hashed MSISDN (issue 14, part 4).
--
-- Until this version, C2B payments found their client by the MSISDN exactly as sent. C2B v2 masks it
-- ("2547 ***** 126") and v1 sends its SHA-256, so thousands of people share one such string: Bob paying
-- business B was recorded as John, business A's customer, and B's dashboard showed him as John. Ingestion no
-- longer matches such a number across businesses (sql/queries/ingest.sql, client_by_masked_phone); this repairs
-- what it merged before.
--
-- Which clients: a phone that is not a full number (the pattern of ingest/wire.py is_full_phone_number: digits
-- with an optional leading +, 7 to 15 of them), no email, and rows in more than one business, counting
-- payments, client_business_transactions and bookings. A client with an email is left alone: email is a real
-- identity (Paystack matches by it across businesses, rightly), and a masked phone never came with one.
--
-- What: the business where the client first appeared (its earliest row of the three tables; ties by business
-- id) keeps the client: that is the payer the client row was created for. Every other business gets its own
-- copy of the client (same name and phone: the only ones we have; created_at = its first row there), and that
-- business's payments, client_business_transactions and bookings are pointed at the copy. Rows of a business
-- never move to another business; only client_id changes. Within one business nothing is split: telling
-- people apart there needs more than this data holds.
--
-- Cost: linear in the tables' sizes. One pass over each of the three tables, grouped by (client, business)
-- with a hash aggregate; each update joins the mapping table on (client, business), by hash or through the
-- client index, finding each row that moves once. No per-row array scan and no per-client loop. The capture triggers record each repointed row like any other update, so
-- the listener brings the figures (clients per business) up to date.

create temporary table split_masked_clients as
with candidates as (
    select id
      from clients
     where phone is not null
       and email is null
       and phone !~ '^\+?[0-9]{7,15}$'
),
seen as (
    -- Each (candidate client, business) pair and the first time the client appeared in that business.
    select u.client_id, u.business_id, min(u.created_at) as first_seen
      from (
            select client_id, business_id, created_at from payments where client_id is not null
            union all
            select client_id, business_id, created_at from client_business_transactions where client_id is not null
            union all
            select client_id, business_id, created_at from bookings where client_id is not null
           ) u
      join candidates c on c.id = u.client_id
     group by u.client_id, u.business_id
),
ranked as (
    select client_id, business_id, first_seen,
           row_number() over (partition by client_id order by first_seen, business_id) as nth
      from seen
)
select client_id as old_client_id, business_id, gen_random_uuid() as new_client_id, first_seen
  from ranked
 where nth > 1;

-- Without statistics the planner would guess the mapping's size; with them it hashes it, once per update.
analyze split_masked_clients;

insert into clients (id, name, phone, email, created_at)
select m.new_client_id, c.name, c.phone, c.email, m.first_seen
  from split_masked_clients m
  join clients c on c.id = m.old_client_id;

update payments p
   set client_id = m.new_client_id
  from split_masked_clients m
 where p.client_id = m.old_client_id and p.business_id = m.business_id;

update client_business_transactions l
   set client_id = m.new_client_id
  from split_masked_clients m
 where l.client_id = m.old_client_id and l.business_id = m.business_id;

update bookings b
   set client_id = m.new_client_id
  from split_masked_clients m
 where b.client_id = m.old_client_id and b.business_id = m.business_id;

drop table split_masked_clients;
