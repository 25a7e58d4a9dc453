use super::*;

fn change(name: &str, values: &[&str]) -> TraceChange {
    TraceChange {
        name: name.into(),
        values: Some(values.iter().map(|v| v.to_string()).collect()),
    }
}

fn clear(name: &str) -> TraceChange {
    TraceChange {
        name: name.into(),
        values: None,
    }
}

/// A fresh folder under the system's temporary directory for one test's trace files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aperture-trace-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

fn tracer_with_file(dir: &std::path::Path) -> Tracer {
    Tracer::new(TraceSettings {
        file: Some(dir.join("trace.json")),
        ..TraceSettings::default()
    })
}

fn read(path: PathBuf) -> Vec<Value> {
    let text = std::fs::read_to_string(&path).expect("trace file");
    match serde_json::from_str(&text).expect("JSON") {
        Value::Array(a) => a,
        other => panic!("not an array: {other}"),
    }
}

/// Runs `n` requests of `model` through the tracer, each traced one finished with two
/// stamps; returns how many were traced.
fn requests(t: &Tracer, model: &str, n: usize) -> usize {
    let mut traced = 0;
    for i in 0..n {
        if let Some(a) = t.start(model, 1, &format!("r{i}")) {
            a.stamps().mark("REQUEST_START");
            a.stamps().mark("REQUEST_END");
            t.finish(a);
            traced += 1;
        }
    }
    traced
}

#[test]
fn defaults_and_answer_layout_follow_triton() {
    let s = TraceSettings::default();
    let j = s.to_json();
    assert_eq!(j["trace_level"], json!(["OFF"]));
    assert_eq!(j["trace_rate"], json!("1000"));
    assert_eq!(j["trace_count"], json!("-1"));
    assert_eq!(j["log_frequency"], json!("0"));
    assert_eq!(j["trace_file"], json!(""));
}

#[test]
fn http_bodies_parse_strings_numbers_arrays_and_null() {
    let c = changes_from_json(
        br#"{"trace_rate": 10, "trace_level": ["TIMESTAMPS"], "trace_count": null}"#,
    )
    .expect("parsed");
    assert!(c.contains(&change("trace_rate", &["10"])));
    assert!(c.contains(&change("trace_level", &["TIMESTAMPS"])));
    assert!(c.contains(&clear("trace_count")));
    assert!(changes_from_json(b"  ").expect("empty").is_empty());
    for bad in [&b"{"[..], b"[1]", br#"{"trace_rate": {"x": 1}}"#] {
        assert!(
            changes_from_json(bad).is_err(),
            "{:?}",
            std::str::from_utf8(bad)
        );
    }
}

#[test]
fn bad_changes_are_refused_whole_with_the_reason() {
    let dir = scratch("refused");
    let t = tracer_with_file(&dir);
    let cases: [(Vec<TraceChange>, Option<&str>, &str); 7] = [
        (
            vec![change("trace_rate", &["0"])],
            None,
            "trace_rate must be an integer >= 1",
        ),
        (
            vec![change("trace_count", &["-2"])],
            None,
            "trace_count must be an integer >= -1",
        ),
        (
            vec![change("trace_level", &["TENSORS"])],
            None,
            "TENSORS is not supported",
        ),
        (
            vec![change("trace_level", &["OFF", "TIMESTAMPS"])],
            None,
            "cannot be combined",
        ),
        (
            vec![change("trace_file", &["/etc/x"])],
            None,
            "cannot be changed through the API",
        ),
        (
            vec![change("log_frequency", &["5"])],
            Some("m"),
            "without a model name",
        ),
        (
            vec![change("trace_colour", &["red"])],
            None,
            "unknown trace setting",
        ),
    ];
    for (changes, model, why) in cases {
        let e = t.settings(model, &changes).expect_err(why).to_string();
        assert!(e.contains(why), "{e:?} should say {why:?}");
    }
    // One bad change in a request leaves the good ones unapplied.
    let mixed = [change("trace_rate", &["7"]), change("trace_rate", &["x"])];
    assert!(t.settings(None, &mixed).is_err());
    assert_eq!(t.settings(None, &[]).expect("read").rate, 1000);
    // The file as it is may be sent back (clients echo the settings they read).
    let same = change(
        "trace_file",
        &[&dir.join("trace.json").display().to_string()],
    );
    assert!(t.settings(None, &[same]).is_ok());
}

#[test]
fn tracing_needs_a_file_set_at_start() {
    let t = Tracer::new(TraceSettings::default());
    let e = t
        .settings(None, &[change("trace_level", &["TIMESTAMPS"])])
        .expect_err("no file");
    assert!(e.to_string().contains("--trace-file"), "{e}");
    assert!(t.start("m", 1, "r").is_none());
}

#[test]
fn models_override_and_clear_back_to_the_server() {
    let dir = scratch("overrides");
    let t = tracer_with_file(&dir);
    t.settings(None, &[change("trace_rate", &["100"])])
        .expect("server");
    let m = t
        .settings(
            Some("det"),
            &[
                change("trace_rate", &["2"]),
                change("trace_level", &["TIMESTAMPS"]),
            ],
        )
        .expect("model");
    assert_eq!((m.rate, m.timestamps), (2, true));
    // The server's own settings are untouched, and follow later server changes.
    let s = t
        .settings(None, &[change("trace_count", &["50"])])
        .expect("server");
    assert_eq!((s.rate, s.timestamps, s.count), (100, false, 50));
    assert_eq!(t.settings(Some("det"), &[]).expect("model").count, 50);
    // Cleared: the model follows the server again; a server setting goes back to its start value.
    let m = t
        .settings(Some("det"), &[clear("trace_rate")])
        .expect("model");
    assert_eq!(m.rate, 100);
    assert_eq!(
        t.settings(None, &[clear("trace_rate")])
            .expect("server")
            .rate,
        1000
    );
}

#[test]
fn one_request_in_rate_is_traced_until_the_count_runs_out() {
    let dir = scratch("sampling");
    let t = tracer_with_file(&dir);
    t.settings(
        None,
        &[
            change("trace_level", &["TIMESTAMPS"]),
            change("trace_rate", &["3"]),
            change("log_frequency", &["100"]),
        ],
    )
    .expect("on");
    assert_eq!(requests(&t, "a", 10), 3); // requests 3, 6, 9
                                          // A model with its own count: two traces, then none; the server's count is unlimited.
    t.settings(
        Some("b"),
        &[change("trace_rate", &["1"]), change("trace_count", &["2"])],
    )
    .expect("model");
    assert_eq!(requests(&t, "b", 5), 2);
    assert_eq!(t.settings(Some("b"), &[]).expect("read").count, 0);
    assert_eq!(t.settings(None, &[]).expect("read").count, -1);
    // The count running out wrote what was collected (3 + 2 traces) to the first indexed file.
    let objects = read(dir.join("trace.json.0"));
    assert_eq!(objects.len(), 2 * 5);
}

#[test]
fn files_hold_triton_trace_objects() {
    let dir = scratch("layout");
    let t = tracer_with_file(&dir);
    t.settings(
        None,
        &[
            change("trace_level", &["TIMESTAMPS"]),
            change("trace_rate", &["1"]),
            change("log_frequency", &["2"]),
        ],
    )
    .expect("on");
    assert_eq!(requests(&t, "det", 5), 5);
    // Every two traces one indexed file; the fifth at shutdown into the next.
    t.flush();
    let first = read(dir.join("trace.json.0"));
    assert_eq!(first.len(), 4);
    assert_eq!(first[0]["model_name"], json!("det"));
    assert_eq!(first[0]["model_version"], json!(1));
    assert_eq!(first[0]["request_id"], json!("r0"));
    let id = first[0]["id"].clone();
    assert_eq!(first[1]["id"], id);
    let stamps = first[1]["timestamps"].as_array().expect("stamps");
    assert_eq!(stamps[0]["name"], json!("REQUEST_START"));
    assert_eq!(stamps[1]["name"], json!("REQUEST_END"));
    let ns = |i: usize| stamps[i]["ns"].as_u64().expect("ns");
    assert!(
        ns(0) <= ns(1) && ns(0) > 1_600_000_000_000_000_000,
        "epoch ns: {}",
        ns(0)
    );
    assert_eq!(read(dir.join("trace.json.1")).len(), 4);
    assert_eq!(read(dir.join("trace.json.2")).len(), 2);
}

#[test]
fn without_a_log_frequency_the_file_is_written_at_shutdown() {
    let dir = scratch("shutdown");
    let t = tracer_with_file(&dir);
    t.settings(
        None,
        &[
            change("trace_level", &["TIMESTAMPS"]),
            change("trace_rate", &["1"]),
        ],
    )
    .expect("on");
    assert_eq!(requests(&t, "det", 3), 3);
    assert!(!dir.join("trace.json").exists());
    t.flush();
    assert_eq!(read(dir.join("trace.json")).len(), 6);
}
