//! A subscriber: connect (in the bounded connect window), join the room,
//! record every frame until the run stops, close cleanly.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};

use super::recorder::Recorder;
use super::Shared;
use crate::client::{self, Joined, ReadEnd, Ws};

/// How one room member's connection went.
pub struct MemberResult {
    /// Time to welcome and to the join ack, from the start of the attempt.
    pub setup: Result<(Duration, Duration), String>,
    pub recorder: Recorder,
    /// Set when the server closed the connection during the run.
    pub server_close: Option<String>,
    pub stream_error: Option<String>,
    pub closed_cleanly: bool,
}

impl MemberResult {
    /// A member that never got to join.
    pub fn failed(error: String, recorder: Recorder) -> Self {
        MemberResult {
            setup: Err(error),
            recorder,
            server_close: None,
            stream_error: None,
            closed_cleanly: false,
        }
    }

    /// A member that joined (`setup`: times to welcome and to the join
    /// ack), read until `end`, and then (maybe) closed.
    pub fn ended(
        setup: (Duration, Duration),
        recorder: Recorder,
        end: &ReadEnd,
        closed_cleanly: bool,
    ) -> Self {
        MemberResult {
            setup: Ok(setup),
            recorder,
            server_close: end.server_close(),
            stream_error: end.stream_error(),
            closed_cleanly,
        }
    }
}

/// One subscriber, from connecting to closing.
pub async fn subscriber(
    index: usize,
    token: String,
    shared: Arc<Shared>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<bool>,
    stop: watch::Receiver<bool>,
) -> MemberResult {
    let room = shared.room_of(index);
    let mut recorder = shared.recorder(room);
    let url = client::ws_url_with_token(&client::ws_endpoint(&shared.args.common.url), &token);
    let setup = async {
        let _slot = connect_slots
            .acquire()
            .await
            .map_err(|_| "connect slots closed".to_string())?;
        shared
            .connect_and_join(&url, room, |text| recorder.frame(text, |_| {}))
            .await
    }
    .await;
    let _ = ready.send(setup.is_ok());
    match setup {
        Err(e) => MemberResult::failed(e, recorder),
        Ok(Joined {
            ws,
            welcomed,
            joined,
        }) => {
            let (end, closed_cleanly) = member_loop(ws, &mut recorder, stop).await;
            MemberResult::ended((welcomed, joined), recorder, &end, closed_cleanly)
        }
    }
}

/// Read frames into `recorder` until `stop`; then close.
async fn member_loop(
    ws: Ws,
    recorder: &mut Recorder,
    mut stop: watch::Receiver<bool>,
) -> (ReadEnd, bool) {
    let (mut sink, mut stream) = ws.split();
    let end =
        client::read_until_stop(&mut stream, &mut stop, |text| recorder.frame(text, |_| {})).await;
    let closed_cleanly = client::close_after(&end, &mut sink, &mut stream).await;
    (end, closed_cleanly)
}
