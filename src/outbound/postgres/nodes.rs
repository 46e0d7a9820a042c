//! Several Docker hosts in the database (SPEC §12): the `nodes` table and
//! its heartbeat, `rtm_route` (migration 0012), which answers where a
//! command runs and places a new game, and what `rtmanager nodes`, `drain`
//! and `undrain` read and write.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::types::Json;

use sqlx::PgPool;

use super::port::InboxRow;
use super::{PgStore, batch, db_error, reply_columns};
use crate::config::NodeConfig;
use crate::domain::{CommandRequest, GameId, NodeName, OpKind};
use crate::error::{ErrorCode, Failure};
use crate::ports::{Admission, Route, RuntimeStore, StoreError};

/// How often a worker tells the database its node is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// A node is live when seen within three heartbeats: placement skips one
/// that is not (its worker is down, or cut off from the database).
pub fn live_within() -> Duration {
    HEARTBEAT * 3
}

/// One row of `rtmanager nodes`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct NodeRow {
    pub name: String,
    pub last_seen: DateTime<Utc>,
    pub max_games: i32,
    pub draining: bool,
    pub live: bool,
    /// Its `running` games.
    pub games: i64,
}

#[derive(Deserialize)]
struct RouteAnswer {
    kind: String,
    node: Option<String>,
}

impl PgStore {
    /// Registers this store's node (or says it is still alive), with its
    /// `RTM_MAX_GAMES`; an operator's `draining` is left as it is.
    pub async fn heartbeat(&self, node: &NodeConfig) -> Result<(), StoreError> {
        sqlx::query(
            "insert into nodes (name, max_games) values ($1, $2)
             on conflict (name) do update
                 set last_seen = now(), max_games = excluded.max_games",
        )
        .bind(node.name.as_str())
        .bind(i32::try_from(node.max_games).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("register the node", e))?;
        Ok(())
    }

    /// The first node of an installation that ran before nodes existed
    /// takes its records: they were written on this one Docker host, the
    /// only one there was. Once a second node has registered, a record
    /// without a node is nobody's to take (the caller logs how many).
    pub async fn adopt_unplaced(&self, node: &NodeName) -> Result<u64, StoreError> {
        let adopted = sqlx::query(
            "update runtime_records set node = $1
             where node is null
               and not exists (select 1 from nodes where name <> $1)",
        )
        .bind(node.as_str())
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("adopt the records written before nodes", e))?;
        Ok(adopted.rows_affected())
    }

    /// Every node, by name, with whether it is live and its running games.
    pub async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        sqlx::query_as(
            "select n.name, n.last_seen, n.max_games, n.draining,
                    n.last_seen > now() - make_interval(secs => $1) as live,
                    (select count(*) from runtime_records r
                     where r.node = n.name and r.status = 'running') as games
             from nodes n
             order by n.name",
        )
        .bind(live_within().as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("list the nodes", e))
    }

    /// Sets a node's `draining`; `false` when no such node registered.
    pub async fn set_draining(&self, node: &NodeName, draining: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("update nodes set draining = $2 where name = $1")
            .bind(node.as_str())
            .bind(draining)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("set the node's draining", e))?;
        Ok(done.rows_affected() == 1)
    }

    /// [`RuntimeStore::route`](crate::ports::RuntimeStore::route): one call
    /// to `rtm_route`. A command without a usable game_id is answered
    /// where it landed (its `invalid_request` says why).
    pub(super) async fn route_request(
        &self,
        request: &CommandRequest,
    ) -> Result<Route, StoreError> {
        let Some(ask) = self.routing_question(request) else {
            return Ok(Route::Here);
        };
        let Json(answer): Json<RouteAnswer> =
            sqlx::query_scalar("select rtm_route($1, $2, $3, $4, make_interval(secs => $5))")
                .bind(ask.game_id.as_str())
                .bind(request.op.as_str())
                .bind(&request.command_id)
                .bind(ask.explicit.as_ref().map(NodeName::as_str))
                .bind(live_within().as_secs_f64())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| db_error("route the command", e))?;
        answer.route(&ask)
    }

    /// [`RuntimeStore::admit`](crate::ports::RuntimeStore::admit): one call
    /// to `rtm_admit` (migration 0013), which routes as `rtm_route` does
    /// and claims the command unless it is forwarded. Without a routing
    /// question (no node, no usable game_id) it is the claim alone.
    pub(super) async fn admit_request(
        &self,
        request: &CommandRequest,
    ) -> Result<Admission, StoreError> {
        let Some(ask) = self.routing_question(request) else {
            return Ok(Admission {
                route: Route::Here,
                claim: Some(self.claim(request).await?),
            });
        };
        let (reply_to, reply_correlation_id) = reply_columns(request);
        let call = AdmitCall {
            game_id: ask.game_id.to_string(),
            op: request.op.as_str(),
            command_id: request.command_id.clone(),
            explicit: ask.explicit.as_ref().map(ToString::to_string),
            me: ask.me.to_string(),
            claim_game_id: request.game_id.clone().unwrap_or_default(),
            reply_to: reply_to.map(str::to_owned),
            reply_correlation_id: reply_correlation_id.map(str::to_owned),
            fingerprint: request.fingerprint(),
        };
        // A start may place its game under `rtm_route`'s advisory lock,
        // which a batch would hold until its commit, across the other
        // calls' row locks: starts go alone.
        let answer = if request.op == OpKind::Start {
            admit_batch(&self.pool, vec![call])
                .await
                .pop()
                .unwrap_or_else(|| Err(StoreError::Corrupt("an admission gave no answer".into())))?
        } else {
            self.batches().admit.call(call).await?
        };
        let route = answer.route.route(&ask)?;
        let claim = match (&route, answer.claimed) {
            (Route::Forward(_), _) => None,
            (_, Some(claimed)) => Some(InboxRow::claim_made(claimed, answer.inbox, request)?),
            (_, None) => {
                return Err(StoreError::Corrupt(format!(
                    "rtm_admit did not claim command {:?}, which runs here",
                    request.command_id
                )));
            }
        };
        Ok(Admission { route, claim })
    }

    /// What routing `request` asks of the database; `None` when there is
    /// nothing to ask and it runs here: a store of no node, or a command
    /// without a usable game_id or node (its `invalid_request` says why).
    fn routing_question(&self, request: &CommandRequest) -> Option<RoutingQuestion<'_>> {
        let me = self.node.as_ref()?;
        let game_id = GameId::parse(request.game_id.as_deref()?).ok()?;
        let explicit = request.placement_node().ok()?;
        Some(RoutingQuestion {
            me,
            game_id,
            explicit,
        })
    }
}

/// One `rtm_admit` call's arguments, owned, for its batch.
pub(super) struct AdmitCall {
    game_id: String,
    op: &'static str,
    command_id: String,
    explicit: Option<String>,
    me: String,
    claim_game_id: String,
    reply_to: Option<String>,
    reply_correlation_id: Option<String>,
    fingerprint: String,
}

/// A batch of `admit` calls: one row of each array per call.
const ADMIT_MANY: &str = "select rtm_admit(a.game_id, a.op, a.command_id, a.explicit,
                 make_interval(secs => $10), a.me, a.claim_game_id, a.reply_to,
                 a.reply_correlation_id, a.fingerprint)
from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::text[], $7::text[], $8::text[], $9::text[])
     as a(game_id, op, command_id, explicit, me, claim_game_id, reply_to,
          reply_correlation_id, fingerprint)";

/// The same for a batch of one, without the `unnest`.
const ADMIT_ONE: &str =
    "select rtm_admit(($1::text[])[1], ($2::text[])[1], ($3::text[])[1], ($4::text[])[1],
                 make_interval(secs => $10), ($5::text[])[1], ($6::text[])[1],
                 ($7::text[])[1], ($8::text[])[1], ($9::text[])[1])";

/// Makes a batch of `rtm_admit` calls in one statement (see [`batch`]).
pub(super) async fn admit_batch(
    pool: &PgPool,
    calls: Vec<AdmitCall>,
) -> Vec<Result<AdmitAnswer, StoreError>> {
    batch::in_key_order(
        calls,
        |c| c.game_id.clone(),
        |calls| {
            let calls = calls.as_slice();
            let query = sqlx::query_scalar::<_, Json<AdmitAnswer>>(if calls.len() == 1 {
                ADMIT_ONE
            } else {
                ADMIT_MANY
            })
            .bind(batch::column(calls, |c| c.game_id.clone()))
            .bind(batch::column(calls, |c| c.op))
            .bind(batch::column(calls, |c| c.command_id.clone()))
            .bind(batch::column(calls, |c| c.explicit.clone()))
            .bind(batch::column(calls, |c| c.me.clone()))
            .bind(batch::column(calls, |c| c.claim_game_id.clone()))
            .bind(batch::column(calls, |c| c.reply_to.clone()))
            .bind(batch::column(calls, |c| c.reply_correlation_id.clone()))
            .bind(batch::column(calls, |c| c.fingerprint.clone()))
            .bind(live_within().as_secs_f64());
            async move {
                let answers = query
                    .fetch_all(pool)
                    .await
                    .map_err(|e| db_error("admit the command", e))?;
                Ok(answers.into_iter().map(|Json(a)| a).collect())
            }
        },
    )
    .await
}

/// A command's routing question: its game, the node it names, if any, and
/// the node asking.
struct RoutingQuestion<'a> {
    me: &'a NodeName,
    game_id: GameId,
    explicit: Option<NodeName>,
}

/// What `rtm_admit` answers: `rtm_route`'s answer and, unless the command
/// is forwarded, whether this call claimed it, else the inbox row found.
#[derive(Deserialize)]
pub(super) struct AdmitAnswer {
    route: RouteAnswer,
    claimed: Option<bool>,
    inbox: Option<InboxRow>,
}

impl RouteAnswer {
    /// The route this answer means for the node asking.
    fn route(&self, ask: &RoutingQuestion<'_>) -> Result<Route, StoreError> {
        let named = || self.node.clone().unwrap_or_default();
        let refused = |code, message: String| Ok(Route::Refused(Failure::new(code, message)));
        match self.kind.as_str() {
            "node" => match self.node.as_deref() {
                None => Ok(Route::Here),
                Some(node) if node == ask.me.as_str() => Ok(Route::Here),
                Some(node) => NodeName::parse(node).map(Route::Forward).map_err(|e| {
                    StoreError::Corrupt(format!("game {} is placed on {e}", ask.game_id))
                }),
            },
            "unknown_node" => refused(
                ErrorCode::InvalidRequest,
                format!(
                    "node {:?} is unknown: no worker of it ever registered",
                    named()
                ),
            ),
            "draining" => refused(
                ErrorCode::ServiceUnavailable,
                format!("node {:?} is draining: it takes no new games", named()),
            ),
            "full" => refused(
                ErrorCode::ServiceUnavailable,
                format!("node {:?} is full: it holds its RTM_MAX_GAMES", named()),
            ),
            "no_room" => refused(
                ErrorCode::ServiceUnavailable,
                "no node has room: every live node is draining or holds its RTM_MAX_GAMES".into(),
            ),
            other => Err(StoreError::Corrupt(format!(
                "rtm_route answered an unknown kind {other:?}"
            ))),
        }
    }
}

/// Where one game lives, as `rtmanager status` shows it: its record's node
/// and its placement (read-only; never places anything).
#[derive(Debug, Clone, PartialEq, Eq, Default, sqlx::FromRow)]
pub struct GamePlacement {
    /// `runtime_records.node`: the node of the last operation that wrote
    /// the record (null: no record, or one from before nodes).
    pub record_node: Option<String>,
    /// Its row of `placements`, unless that row belongs to an earlier life
    /// (made before the game's removal: the next start is placed afresh),
    /// as `rtm_route` reads it.
    pub placed_node: Option<String>,
    pub placed_at: Option<DateTime<Utc>>,
    /// The start that placed it.
    pub placed_by: Option<String>,
}

impl PgStore {
    /// [`GamePlacement`] of `game_id` (all `None` for a game never seen).
    pub async fn game_placement(&self, game_id: &str) -> Result<GamePlacement, StoreError> {
        sqlx::query_as(
            "select r.node as record_node, p.node as placed_node, p.placed_at,
                    p.command_id as placed_by
             from (select $1::text as game_id) g
                      left join runtime_records r on r.game_id = g.game_id
                      left join placements p on p.game_id = g.game_id
                 and not (r.status is not distinct from 'removed'
                          and p.placed_at <= r.updated_at)",
        )
        .bind(game_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_error("read the game's node and placement", e))
    }
}
