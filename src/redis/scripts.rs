//! Every Lua script of the hub and the task queue (`scripts/*.lua`), each
//! one atomic step on keys of one cluster slot (see [`super::keys`]).

use redis::Script;

/// One Lua script: its source (for `SCRIPT LOAD` in pipelines) and the
/// redis-rs handle (EVALSHA, loading it when Redis lost it).
pub struct Lua {
    script: Script,
    source: &'static str,
}

impl Lua {
    pub fn new(source: &'static str) -> Lua {
        Lua {
            script: Script::new(source),
            source,
        }
    }

    /// The script's source, for `SCRIPT LOAD`.
    pub fn source(&self) -> &'static str {
        self.source
    }
}

impl std::ops::Deref for Lua {
    type Target = Script;
    fn deref(&self) -> &Script {
        &self.script
    }
}

/// All the scripts.
pub struct Scripts {
    // Rooms, presence, the registry.
    pub publish_room: Lua,
    pub presence_join: Lua,
    pub presence_leave: Lua,
    pub register: Lua,
    pub beat: Lua,
    pub reap_claim: Lua,
    // The task queue.
    pub submit: Lua,
    pub enqueue: Lua,
    pub unsubmit: Lua,
    pub cancel: Lua,
    pub progress: Lua,
    pub start: Lua,
    pub renew: Lua,
    pub retry: Lua,
    pub finish: Lua,
    pub retain: Lua,
}

impl Scripts {
    pub fn load() -> Scripts {
        Scripts {
            publish_room: Lua::new(include_str!("scripts/publish_room.lua")),
            presence_join: Lua::new(include_str!("scripts/presence_join.lua")),
            presence_leave: Lua::new(include_str!("scripts/presence_leave.lua")),
            register: Lua::new(include_str!("scripts/register.lua")),
            beat: Lua::new(include_str!("scripts/beat.lua")),
            reap_claim: Lua::new(include_str!("scripts/reap_claim.lua")),
            submit: Lua::new(include_str!("scripts/submit.lua")),
            enqueue: Lua::new(include_str!("scripts/enqueue.lua")),
            unsubmit: Lua::new(include_str!("scripts/unsubmit.lua")),
            cancel: Lua::new(include_str!("scripts/cancel.lua")),
            progress: Lua::new(include_str!("scripts/progress.lua")),
            start: Lua::new(include_str!("scripts/start.lua")),
            renew: Lua::new(include_str!("scripts/renew.lua")),
            retry: Lua::new(include_str!("scripts/retry.lua")),
            finish: Lua::new(include_str!("scripts/finish.lua")),
            retain: Lua::new(include_str!("scripts/retain.lua")),
        }
    }
}
