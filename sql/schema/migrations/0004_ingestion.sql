-- Payment ingestion (webhooks). An M-Pesa payment can reach us twice, as an STK push result and as a C2B
-- confirmation, under two different provider references (CheckoutRequestID, TransID). The receipt number
-- (MpesaReceiptNumber = TransID) is the one key both carry, so it is unique on its own: whichever arrives
-- second finds the payment the first recorded (docs/ARCHITECTURE.md, "Payment ingestion").

alter table payments add column mpesa_receipt text check (length(mpesa_receipt) between 1 and 64);
create unique index payments_mpesa_receipt_key on payments (mpesa_receipt) where mpesa_receipt is not null;
