-- An index for the one query that reads the log by command: an attempt's
-- progress (what earlier attempts of this command recorded), read by every
-- attempt as it begins (`rtm_begin`, migration 0009). Without it that read
-- scanned the whole log, so every command cost more than the one before:
-- on a log of a few thousand entries it was most of the database's CPU.
create index operation_log_command on operation_log (command_id, operation_id);
