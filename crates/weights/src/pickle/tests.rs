//! Opcode-level tests with hand-assembled pickles (bytes as CPython would write them).

use super::{unpickle, Value};

fn run(bytes: &[u8]) -> Value {
    unpickle(bytes).unwrap_or_else(|e| panic!("offset {}: {}", e.offset, e.reason))
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => panic!("expected int, got {}", other.kind()),
    }
}

#[test]
fn protocol0_text_opcodes() {
    // pickle.dumps({'key': 42, 'f': 1.5, 'l': [1, 2], 'b': True, 'again': <memo 4>}, protocol=0)
    let v = run(b"(dp0\nVkey\np1\nI42\nsVf\np2\nF1.5\nsVl\np3\n(lp4\nI1\naI2\nasVb\np5\nI01\nsVagain\np6\ng4\ns.");
    assert_eq!(int(&v.dict_get("key").unwrap()), 42);
    assert!(matches!(v.dict_get("f"), Some(Value::Float(f)) if f == 1.5));
    let l: Vec<i64> = v
        .dict_get("l")
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(int)
        .collect();
    assert_eq!(l, vec![1, 2]);
    assert!(matches!(v.dict_get("b"), Some(Value::Bool(true))));
    assert_eq!(v.dict_get("again").unwrap().items().unwrap().len(), 2);
}

#[test]
fn memoised_dict_is_seen_filled_by_later_references() {
    // {'a': d, 'b': d} where d = {'k': 5}: d is memoised (BINPUT 1) before SETITEMS fills it.
    let v = run(
        b"\x80\x02}q\x00(X\x01\x00\x00\x00a}q\x01X\x01\x00\x00\x00kK\x05sX\x01\x00\x00\x00bh\x01u.",
    );
    for key in ["a", "b"] {
        assert_eq!(
            int(&v.dict_get(key).unwrap().dict_get("k").unwrap()),
            5,
            "{key}"
        );
    }
}

#[test]
fn long1_is_twos_complement() {
    assert_eq!(int(&run(b"\x8a\x02\x00\xff.")), -256);
    assert_eq!(int(&run(b"\x8a\x00.")), 0);
    assert_eq!(int(&run(b"\x8a\x01\x7f.")), 127);
    assert!(matches!(
        run(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01."),
        Value::Opaque(_)
    ));
}

#[test]
fn ordered_dict_from_list_of_pairs() {
    // OrderedDict([('a', 1)]) via REDUCE with a list argument.
    let v = run(b"\x80\x02ccollections\nOrderedDict\n]X\x01\x00\x00\x00aK\x01\x86a\x85R.");
    assert_eq!(int(&v.dict_get("a").unwrap()), 1);
}

#[test]
fn protocol4_stack_global_and_memoize() {
    // pickle.dumps(collections.OrderedDict(x=7), protocol=4)
    let v = run(
        b"\x80\x04\x95\x29\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94\x8c\x01x\x94K\x07s.",
    );
    assert_eq!(int(&v.dict_get("x").unwrap()), 7);
}

#[test]
fn unknown_callables_become_opaque_and_accept_state() {
    let v = run(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n)R}X\x01\x00\x00\x00aK\x01sb.");
    match v {
        Value::Opaque(what) => assert!(
            what.contains("numpy.core.multiarray._reconstruct"),
            "{what}"
        ),
        other => panic!("expected opaque, got {}", other.kind()),
    }
}

#[test]
fn malformed_streams_are_errors_not_panics() {
    let cases: [(&[u8], &str); 7] = [
        (b"\x80\x02R.", "stack underflow"),
        (b"\x80\x02K\x01", "unexpected end"),
        (b"(K\x01\x86.", "stack underflow"),
        (b"\x80\x02h\x05.", "memo entry 5"),
        (b"X\x02\x00\x00\x00\xff\xfe.", "UTF-8"),
        (b"X\xff\xff\xff\xff.", "unexpected end"),
        (b"\x80\x09.", "protocol 9"),
    ];
    for (bytes, want) in cases {
        let err = unpickle(bytes).unwrap_err();
        assert!(err.reason.contains(want), "{bytes:?}: {}", err.reason);
    }
}

#[test]
fn deeply_nested_containers_do_not_overflow_the_stack() {
    // A million nested 1-tuples (one byte each) would overflow a recursive drop.
    let mut b = b"K\x00".to_vec();
    b.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    b.push(b'.');
    let v = run(&b);
    assert!(matches!(v, Value::Tuple(_)));
    drop(v);
    // {'a': {'a': ...}} 200,000 levels deep, then searched for a state dict.
    let n = 200_000;
    let mut b = b"}".to_vec();
    for _ in 0..n {
        b.extend_from_slice(b"X\x01\x00\x00\x00a}");
    }
    b.extend(std::iter::repeat_n(b's', n));
    b.push(b'.');
    let v = run(&b);
    let err = crate::unwrap::select_state_dict(&v).unwrap_err();
    assert!(err.contains("no tensors found"), "{err}");
}

/// The data.pkl of a fixture checkpoint, as CPython's pickler wrote it.
fn fixture_pickle(name: &str) -> Vec<u8> {
    use std::io::Read;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut entry = zip.by_name("archive/data.pkl").unwrap();
    let mut buf = Vec::new();
    entry.read_to_end(&mut buf).unwrap();
    buf
}

#[test]
fn every_truncation_and_byte_flip_is_handled() {
    for name in ["bare.pt", "nested_module.pt"] {
        let full = fixture_pickle(name);
        assert!(unpickle(&full).is_ok());
        for cut in 0..full.len() {
            assert!(unpickle(&full[..cut]).is_err(), "{name} cut at {cut}");
        }
        // Corrupted bytes may still parse; the point is that nothing panics.
        for i in 0..full.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = full.clone();
                b[i] ^= flip;
                if let Ok(v) = unpickle(&b) {
                    let _ = crate::unwrap::select_state_dict(&v);
                }
            }
        }
    }
}
