//! Domain types: parsed once at the boundary, never re-checked inside.
//! Nothing here performs I/O.

pub mod command;
pub mod event;
pub mod game_id;
pub mod image_ref;
pub mod journal;
pub mod node;
pub mod operation;
pub mod runtime;

pub use command::{Action, Command, CommandRequest, ReplyTo};
pub use event::OutcomeEvent;
pub use game_id::GameId;
pub use image_ref::{AllowedImages, ImageRef, NotSemver};
pub use journal::{PriorEntry, Progress, Stage, Step};
pub use node::NodeName;
pub use operation::{EntryResult, OpKind, OpSource, OperationEntry, Outcome, StopReason};
pub use runtime::{ContainerId, RecordUpdate, RuntimeRecord, RuntimeState, RuntimeStatus};
