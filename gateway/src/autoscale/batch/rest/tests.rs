use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use super::*;
use crate::autoscale::batch::parse_view;

// Captured from Slurm 22.05.8's slurmrestd (see fixtures/README.md for the cluster and queue).
const JOBS: &str = include_str!("../fixtures/slurmrestd-22.05-v0.0.38-jobs.json");
const NODES: &str = include_str!("../fixtures/slurmrestd-22.05-v0.0.38-nodes.json");
const SQUEUE: &str = include_str!("../fixtures/squeue-same-instant.txt");
const SINFO: &str = include_str!("../fixtures/sinfo-same-instant.txt");
const EXPIRED: &str = include_str!("../fixtures/slurmrestd-22.05-v0.0.38-expired-token.json");

/// A token `scontrol token username=nobody lifespan=600` printed (from a throwaway test cluster
/// whose key is gone).
const SCONTROL_TOKEN: &str = "SLURM_JWT=eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE3OTYzNzYyNDIsImlhdCI6MTc5NjM3NTY0Miwic3VuIjoibm9ib2R5In0.YZKfMneRZlUnj44zv3jrp111glemRgjfbZFfm_OeYEk";

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture is JSON")
}

#[test]
fn slurmrestd_22_05_answers_map_to_the_view_squeue_and_sinfo_give() {
    let rest = parse_rest_view(&json(JOBS), &json(NODES), "pool").expect("parses");
    let commands = parse_view(SQUEUE, SINFO);
    assert_eq!(rest, commands);
    // Jobs 2, 3, 4 and 6 pend in `pool` (5 pends in `other`, 7 was cancelled); 2 (Resources,
    // one node) and 6 (Priority, two nodes) would start on more VMs, 3 (Dependency) and 4
    // (held) would not.
    assert_eq!(rest.pending_jobs, 4);
    assert_eq!(rest.pending_nodes, 3);
    assert_eq!(rest.running_jobs, 1);
    assert_eq!(rest.nodes.len(), 2);
    assert!(rest.nodes["vm-a"].busy && !rest.nodes["vm-a"].drain);
    assert_eq!(rest.nodes["vm-a"].reason, "none");
    assert!(!rest.nodes["vm-b"].busy && rest.nodes["vm-b"].drained_by_poolgate());
    // The other partition: only vm-b, no running job, job 5 pending.
    let other = parse_rest_view(&json(JOBS), &json(NODES), "other").expect("parses");
    assert_eq!((other.pending_jobs, other.running_jobs), (1, 0));
    assert_eq!(other.nodes.keys().collect::<Vec<_>>(), vec!["vm-b"]);
}

#[test]
fn later_api_shapes_are_read_by_the_same_names() {
    // Shapes of the v0.0.40 data parser (Slurm 23.11's source): states are lists of flags,
    // counts are objects, partitions may be one comma-separated string. Written by hand, not
    // captured.
    let jobs = json!({"jobs": [
        {"partition": "pool", "job_state": ["PENDING"], "state_reason": "Resources",
         "node_count": {"set": true, "infinite": false, "number": 3}},
        {"partition": "pool,other", "job_state": ["RUNNING", "COMPLETING"], "state_reason": "None",
         "node_count": {"set": true, "infinite": false, "number": 1}},
        {"partition": "pool", "job_state": ["PENDING"], "state_reason": "JobHeldAdmin",
         "node_count": {"set": false, "infinite": false, "number": 0}},
        {"partition": "pool", "job_state": ["COMPLETED"], "state_reason": "None"},
    ]});
    let nodes = json!({"nodes": [
        {"name": "vm-a", "state": ["MIXED", "DRAIN"], "reason": "poolgate-drain", "partitions": ["pool"]},
        {"name": "vm-b", "state": ["IDLE", "POWERED_DOWN"], "reason": "", "partitions": "pool,other"},
        {"name": "vm-c", "state": ["IDLE"], "partitions": ["other"]},
        {"state": ["IDLE"], "partitions": ["pool"]},
    ]});
    let v = parse_rest_view(&jobs, &nodes, "pool").expect("parses");
    assert_eq!((v.pending_jobs, v.pending_nodes, v.running_jobs), (2, 3, 1));
    assert_eq!(v.nodes.len(), 2);
    assert!(v.nodes["vm-a"].busy && v.nodes["vm-a"].drained_by_poolgate());
    assert!(!v.nodes["vm-b"].busy && !v.nodes["vm-b"].drain);
    assert_eq!(v.nodes["vm-b"].reason, "none");
}

#[test]
fn nodes_whose_slurmd_has_not_registered_read_the_same_as_from_sinfo() {
    // v0.0.38 shapes (a base state and flags) and later ones (one list), for what sinfo shows
    // as down*, unknown, idle~, inval, idle* and idle.
    let nodes = json!({"nodes": [
        {"name": "a", "state": "down", "state_flags": ["NOT_RESPONDING"], "reason": "Not responding", "partitions": ["pool"]},
        {"name": "b", "state": "unknown", "state_flags": [], "reason": "", "partitions": ["pool"]},
        {"name": "c", "state": ["IDLE", "CLOUD", "POWERED_DOWN"], "partitions": ["pool"]},
        {"name": "d", "state": "idle", "state_flags": ["INVALID_REG"], "reason": "bad config", "partitions": ["pool"]},
        {"name": "e", "state": ["IDLE", "NOT_RESPONDING"], "partitions": ["pool"]},
        {"name": "f", "state": "idle", "state_flags": ["DYNAMIC_NORM"], "partitions": ["pool"]},
    ]});
    let rest = parse_rest_view(&json!({"jobs": []}), &nodes, "pool").expect("parses");
    let sinfo = "a|down*|Not responding\nb|unknown|none\nc|idle~|none\nd|inval|bad config\n\
                 e|idle*|none\nf|idle|none\n";
    assert_eq!(rest, parse_view("", sinfo));
    assert_eq!(
        rest.nodes["a"].unregistered.as_deref(),
        Some("DOWN+NOT_RESPONDING")
    );
    assert_eq!(rest.nodes["f"].unregistered, None);
    // The captured answers: both nodes registered.
    let captured = parse_rest_view(&json(JOBS), &json(NODES), "pool").expect("parses");
    assert!(captured.nodes.values().all(|n| n.unregistered.is_none()));
}

#[test]
fn an_answer_without_the_lists_is_a_failed_read() {
    let e = parse_rest_view(&json!({"meta": {}}), &json(NODES), "pool").unwrap_err();
    assert_eq!(e, "slurmrestd's /jobs answer has no \"jobs\" list");
    let e = parse_rest_view(&json(JOBS), &json!([]), "pool").unwrap_err();
    assert_eq!(e, "slurmrestd's /nodes answer has no \"nodes\" list");
}

#[test]
fn slurm_errors_are_one_line_each() {
    assert_eq!(
        slurm_errors(&json(EXPIRED)),
        vec!["Unspecified error (Failed while looking for jobs, from slurm_load_jobs)"]
    );
    assert!(slurm_errors(&json(JOBS)).is_empty());
}

fn token_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write token");
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    f
}

#[test]
fn the_token_file_holds_scontrol_tokens_output_or_the_bare_token() {
    let bare = SCONTROL_TOKEN.trim_start_matches("SLURM_JWT=");
    for text in [
        format!("{SCONTROL_TOKEN}\n"),
        format!("{bare}\n"),
        format!("# rotated by cron\nexport {SCONTROL_TOKEN}\n"),
    ] {
        let f = token_file(&text);
        let token = read_token(f.path()).expect("a token");
        assert_eq!(token, bare);
        assert_eq!(token_user(&token).as_deref(), Some("nobody"));
    }
    let f = token_file("not a token at all\n");
    let e = read_token(f.path()).unwrap_err();
    assert_eq!(
        e,
        format!(
            "{} (batch.rest_token_file) holds no JWT (write the output of scontrol token username=USER into it)",
            f.path().display()
        )
    );
    assert!(
        !e.contains("not a token"),
        "the file's content is not echoed"
    );
    let e = read_token(Path::new("/nonexistent/poolgate/jwt")).unwrap_err();
    assert!(
        e.starts_with(
            "cannot read the slurmrestd token /nonexistent/poolgate/jwt (batch.rest_token_file): "
        ),
        "{e}"
    );
    // A token without a user claim needs batch.rest_user.
    assert_eq!(token_user("eyJhbGciOiJIUzI1NiJ9.e30.c2ln"), None);
}

/// An HTTP/1.1 answer.
fn http(status: &str, content_type: &str, body: &str) -> Option<String> {
    Some(format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// An HTTP server on loopback answering every connection with `answer` (or holding it open
/// without a word when `None`).
async fn server(answer: Option<String>) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = socket.read(&mut buf).await;
                match answer {
                    Some(a) => {
                        let _ = socket.write_all(a.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    (url, task)
}

fn engine_for(url: &str, token: &tempfile::NamedTempFile) -> SlurmRest {
    let config = Batch {
        rest_url: Some(format!("{url}/")),
        rest_token_file: Some(token.path().to_owned()),
        timeout: Duration::from_millis(500),
        ..Batch::default()
    };
    SlurmRest::new(&config).expect("engine")
}

#[tokio::test]
async fn slurmrestd_refusing_failing_garbling_or_silent_is_a_failed_read_that_says_what_to_check() {
    let token = token_file(SCONTROL_TOKEN);
    let secret = SCONTROL_TOKEN.trim_start_matches("SLURM_JWT=");
    let cases = [
        (
            http("401 UNAUTHORIZED", "text/plain", "Authentication failure"),
            "(HTTP 401 Unauthorized): check that batch.rest_token_file holds a valid token",
        ),
        (
            // What 22.05 answers for an expired token (fixtures/README.md).
            http("500 INTERNAL ERROR", "application/json", EXPIRED),
            "(HTTP 500 Internal Server Error: Unspecified error (Failed while looking for jobs, from slurm_load_jobs)); Slurm 22.05 answers so when the token has expired or is not valid",
        ),
        (
            http("200 OK", "text/html", "<html>hi<"),
            "with HTTP 200 OK and no JSON (starts \"<html>hi<\"); is batch.rest_url slurmrestd?",
        ),
        (
            http("404 NOT FOUND", "text/plain", "no!"),
            "(HTTP 404): batch.rest_version \"v0.0.38\" is not among the versions it serves",
        ),
        (None, "did not answer within 500ms (batch.timeout)"),
    ];
    for (answer, expected) in cases {
        let (url, task) = server(answer).await;
        let e = engine_for(&url, &token).observe().await.unwrap_err();
        assert!(e.contains(expected), "{expected:?} not in {e:?}");
        assert!(!e.contains(secret), "the token leaked into {e:?}");
        task.abort();
    }
    // Nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let e = engine_for(&format!("http://127.0.0.1:{port}"), &token)
        .observe()
        .await
        .unwrap_err();
    assert!(
        e.starts_with(&format!(
            "cannot reach slurmrestd at http://127.0.0.1:{port}/slurm/v0.0.38/"
        )) && e.contains("is slurmrestd running and listening there?"),
        "{e}"
    );
}
