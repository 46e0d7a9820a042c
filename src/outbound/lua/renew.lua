-- Renews a game's lease, only for its holder (compare-and-PEXPIRE).
--
-- KEYS[1]  the lease key, `<prefix>lease:<game_id>`
-- ARGV[1]  the holder's value, `<command_id>:<token>`
-- ARGV[2]  the new time to live in milliseconds (a positive integer)
--
-- Returns  1 when the key held exactly ARGV[1] and its PX is now ARGV[2];
--          0 when it did not (expired, released, or held by another), and
--          the key is left untouched.

if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
