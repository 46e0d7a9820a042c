-- The fence row says which command took it, and may exist at 0.
--
-- A command refused the game's lease (`conflict`, or the lease store down)
-- answers without holding it, so its answer is checked against the fence it
-- read once refused: if any operation took the game since, the answer is
-- dropped, because that operation may be another copy of the same command,
-- which must be the one to answer it. The check locks the fence row `for
-- share` until commit, so the row must exist even for a game no operation
-- has taken yet: reading the fence creates it at 0. The first
-- `advance_fence` still hands out 1.
alter table game_fences
    drop constraint game_fences_fence_check,
    add constraint game_fences_fence_check check (fence >= 0);

-- The command whose attempt took the current fence (null at 0). A refused
-- command that finds its own command_id here does not answer: an attempt of
-- it holds, or held, the game, and it is that attempt's outcome (or its
-- resumption) that answers the command.
alter table game_fences
    add column command_id text;
