-- Releases a game's lease, only for its holder (compare-and-DEL).
--
-- KEYS[1]  the lease key, `<prefix>lease:<game_id>`
-- ARGV[1]  the holder's value, `<command_id>:<token>`
--
-- Returns  1 when the key held exactly ARGV[1] and is now deleted;
--          0 when it did not (expired, released, or held by another), and
--          the key is left untouched.

if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
