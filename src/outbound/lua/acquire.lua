-- Acquires a game's lease (SPEC §10), or tells who holds it.
--
-- KEYS[1]  the lease key, `<prefix>lease:<game_id>`
-- ARGV[1]  the holder's value, `<command_id>:<token>`
-- ARGV[2]  the time to live in milliseconds (a positive integer)
--
-- Returns  1 when the lease is now held by ARGV[1]: it was free and is set
--          with PX ARGV[2], or ARGV[1] already held it (the same holder
--          retrying) and its PX is refreshed to ARGV[2];
--          otherwise the value stored by the current holder (a string), so
--          the caller learns which command holds it.

if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end

local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
-- A script runs atomically and sees time frozen, so a key SET NX refused
-- is still there: `current` is a string.
return current
