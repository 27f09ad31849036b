//! The wire protocol (docs/protocol.md §3–§5): client frames, server frames,
//! error codes, close codes, room names and message ids.
//!
//! Everything a client can see is defined in this module, so the tables of
//! docs/protocol.md are visible in one place:
//!
//! - [`client`]: [`ClientFrame`] (client → server) and its parser;
//! - [`server`]: one encoder per server frame (`*_frame`, [`Ack`]);
//! - [`codes`]: [`ErrorCode`] and [`CloseReason`];
//! - [`names`]: [`RoomName`], [`MessageId`], user ids.

pub mod client;
pub mod codes;
pub mod names;
pub mod server;

pub use client::{parse_client_frame, ClientFrame, Ref};
pub use codes::{CloseReason, ErrorCode, ErrorReply};
pub use names::{valid_user_id, InvalidMessageId, InvalidRoomName, MessageId, RoomName};
pub use server::{
    broadcast_frame, direct_frame, error_frame, message_frame, pong_frame, presence_change_frame,
    presence_frame, task_record_frame, welcome_frame, Ack, PresenceEntry, TaskEvent, TaskStatus,
};
