//! Secret values stay out of the index. A running sandbox's execs and file
//! operations are recorded in `airlock.db` with what the caller sent
//! (argv, paths), and a caller can send a secret's value there as easily
//! as the sandbox can print it. The daemon never holds the values (the
//! sandbox's supervisor read them at launch), so it asks the supervisor to
//! redact each such string first, which applies the very function its
//! audit log applies to every string of an event. A string the supervisor
//! could not redact is not recorded: [`WITHHELD`] stands in its place.

use airlock_runtime::supervisor::SupervisorClient;
use serde_json::Value;

/// What the index keeps of a string that could not be redacted.
pub const WITHHELD: &str = "[WITHHELD: the sandbox's supervisor could not redact it]";

/// `texts` as the index may keep them.
pub fn texts(client: &SupervisorClient, texts: &[String]) -> Vec<String> {
    if texts.is_empty() {
        return Vec::new();
    }
    client.redact(texts.to_vec()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "could not have strings redacted for the index; they are withheld");
        vec![WITHHELD.to_owned(); texts.len()]
    })
}

/// `detail` with every string in it as the index may keep it, in one
/// request to the supervisor.
pub fn detail(client: &SupervisorClient, mut detail: Value) -> Value {
    let mut found = Vec::new();
    visit(&mut detail, &mut |s| found.push(std::mem::take(s)));
    let mut clean = texts(client, &found).into_iter();
    visit(&mut detail, &mut |s| *s = clean.next().unwrap_or_else(|| WITHHELD.to_owned()));
    detail
}

/// Calls `f` on every string in `value` (object keys are airlock's own),
/// in one fixed order.
fn visit(value: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| visit(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| visit(v, f)),
        _ => {}
    }
}
