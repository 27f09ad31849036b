// Compiled (not run) by `npm run typecheck`: the published types fit the
// ways the client is meant to be used, in browsers and in Node with `ws`.
import NodeWebSocket from "ws";
import {
  Switchboard,
  SwitchboardError,
  type ConnectionState,
  type PublishOptions,
  type RoomMessage,
  type SwitchboardOptions,
  type TaskRecord,
  type TaskUpdate,
} from "../src/switchboard.js";

const options: SwitchboardOptions = {
  token: "jwt",
  WebSocket: NodeWebSocket,
  offline: "reject",
  maxQueue: 10,
  maxBufferedFrames: 500,
  goingAwayReconnectWindowMs: 0,
};
const node = new Switchboard("ws://localhost:8000/ws", options);
const browser = new Switchboard("/ws", { token: async () => "jwt", WebSocket: globalThis.WebSocket });

node.addEventListener("message", (e) => {
  const m: RoomMessage = e.detail;
  m.id.toUpperCase();
});
browser.on("task", (u: TaskUpdate) => u.status === "done");
browser.on("disconnected", (d) => d.willReconnect && d.delayMs);
browser.on("closed", ({ code, reason }) => `${code} ${reason}`);
browser.on("recovery", ({ room, recovered }) => (recovered ? room : null));
node.addEventListener("custom-thing", (e: Event) => e.type);

async function flow(): Promise<void> {
  const state: ConnectionState = node.state;
  void state;
  await node.ready(5000);
  const { recovered } = await node.join("lobby", { since: "1-0" });
  const id: string = await node.publish("lobby", { text: "hi" });
  const once: PublishOptions = { idempotencyKey: "order-42", timeoutMs: 10_000, offline: "queue" };
  const sameId: string = await node.publish("lobby", { text: "hi" }, once);
  const directId: string = await node.direct("bob", 1, { timeoutMs: 100 });
  const users = await node.presence("lobby");
  users[0].connections.toFixed();
  const taskId: string = await node.task("echo", {}, { idempotencyKey: "k", onUpdate: (u) => u.progress });
  const rec: TaskRecord = await node.taskStatus(taskId);
  await node.taskCancel(rec.task_id);
  const rtt: number = await node.ping();
  await node.refreshToken();
  await node.leave("lobby");
  await node.close();
  void [recovered, id, sameId, directId, rtt];
  try {
    await node.publish("x", 1);
  } catch (e) {
    if (e instanceof SwitchboardError) e.code.toLowerCase();
  }
}
void flow;
