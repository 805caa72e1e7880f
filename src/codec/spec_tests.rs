//! The method table checked against the spec XML, and every method round-tripped.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const SPEC_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/spec/amqp0-9-1.extended.xml"
);

/// RabbitMQ's extensions that its own codegen has but the extended XML does not.
const NOT_IN_XML: &[&str] = &[
    "connection.blocked",
    "connection.unblocked",
    "connection.update-secret",
    "connection.update-secret-ok",
];

#[derive(Debug, PartialEq)]
struct SpecMethod {
    class: String,
    class_id: u16,
    method: String,
    method_id: u16,
    content: bool,
    fields: Vec<(String, String)>,
}

fn attribute<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> &'a str {
    node.attribute(name)
        .unwrap_or_else(|| panic!("<{}> without {name}", node.tag_name().name()))
}

fn field_type(node: roxmltree::Node<'_, '_>, domains: &[(String, String)]) -> String {
    if let Some(kind) = node.attribute("type") {
        return kind.to_string();
    }
    let domain = attribute(node, "domain");
    domains
        .iter()
        .find(|(name, _)| name == domain)
        .map(|(_, kind)| kind.clone())
        .unwrap_or_else(|| panic!("unknown domain {domain}"))
}

fn spec() -> (Vec<SpecMethod>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(SPEC_PATH)
        .unwrap_or_else(|e| panic!("the spec must sit at {SPEC_PATH}: {e}"));
    let document = roxmltree::Document::parse(&text).expect("spec XML parses");
    let root = document.root_element();
    let domains: Vec<(String, String)> = root
        .children()
        .filter(|n| n.has_tag_name("domain"))
        .map(|n| {
            (
                attribute(n, "name").to_string(),
                attribute(n, "type").to_string(),
            )
        })
        .collect();
    let mut methods = Vec::new();
    let mut basic_properties = Vec::new();
    for class in root.children().filter(|n| n.has_tag_name("class")) {
        let class_name = attribute(class, "name");
        let class_id: u16 = attribute(class, "index").parse().unwrap();
        for child in class.children() {
            if child.has_tag_name("field") && class_name == "basic" {
                basic_properties.push((
                    attribute(child, "name").to_string(),
                    field_type(child, &domains),
                ));
            }
            if !child.has_tag_name("method") {
                continue;
            }
            methods.push(SpecMethod {
                class: class_name.to_string(),
                class_id,
                method: attribute(child, "name").to_string(),
                method_id: attribute(child, "index").parse().unwrap(),
                content: child.attribute("content") == Some("1"),
                fields: child
                    .children()
                    .filter(|n| n.has_tag_name("field"))
                    .map(|n| (attribute(n, "name").to_string(), field_type(n, &domains)))
                    .collect(),
            });
        }
    }
    (methods, basic_properties)
}

fn ours(info: &MethodInfo) -> SpecMethod {
    SpecMethod {
        class: info.class_name.to_string(),
        class_id: info.class_id,
        method: info.method_name.to_string(),
        method_id: info.method_id,
        content: info.has_content,
        fields: info
            .fields
            .iter()
            .map(|f| (f.name.to_string(), f.kind.spec_name().to_string()))
            .collect(),
    }
}

#[test]
fn method_table_matches_the_spec_xml() {
    let (spec_methods, _) = spec();
    assert!(
        spec_methods.len() >= 60,
        "the spec parsed to too few methods"
    );
    for spec_method in &spec_methods {
        let info = METHOD_TABLE
            .iter()
            .find(|m| m.class_name == spec_method.class && m.method_name == spec_method.method)
            .unwrap_or_else(|| {
                panic!(
                    "{}.{} is in the spec but not in the table",
                    spec_method.class, spec_method.method
                )
            });
        assert_eq!(&ours(info), spec_method);
    }
    for info in METHOD_TABLE {
        let name = format!("{}.{}", info.class_name, info.method_name);
        let in_spec = spec_methods
            .iter()
            .any(|m| m.class == info.class_name && m.method == info.method_name);
        assert!(
            in_spec || NOT_IN_XML.contains(&name.as_str()),
            "{name} is in the table but not in the spec"
        );
    }
    assert_eq!(METHOD_TABLE.len(), spec_methods.len() + NOT_IN_XML.len());
}

#[test]
fn basic_properties_match_the_spec_xml() {
    let (_, spec_properties) = spec();
    let ours: Vec<(String, String)> = BASIC_PROPERTY_TABLE
        .iter()
        .map(|f| (f.name.to_string(), f.kind.spec_name().to_string()))
        .collect();
    assert_eq!(ours, spec_properties);
}

#[test]
fn class_and_method_ids_are_unique() {
    for (i, a) in METHOD_TABLE.iter().enumerate() {
        for b in &METHOD_TABLE[i + 1..] {
            assert!(
                (a.class_id, a.method_id) != (b.class_id, b.method_id),
                "{}.{} and {}.{} share ids",
                a.class_name,
                a.method_name,
                b.class_name,
                b.method_name
            );
        }
    }
}

/// Argument bytes for `info` with values derived from `seed`, built from the table alone.
fn synthetic_arguments(info: &MethodInfo, seed: u64) -> Bytes {
    let mut out = BytesMut::new();
    let mut bits: Vec<bool> = Vec::new();
    let flush = |out: &mut BytesMut, bits: &mut Vec<bool>| {
        for chunk in bits.chunks(8) {
            let octet = chunk
                .iter()
                .enumerate()
                .fold(0u8, |acc, (i, b)| acc | (u8::from(*b) << i));
            out.put_u8(octet);
        }
        bits.clear();
    };
    for (index, field) in info.fields.iter().enumerate() {
        let value = seed.wrapping_mul(31).wrapping_add(index as u64 * 7 + 1);
        if field.kind != FieldKind::Bit {
            flush(&mut out, &mut bits);
        }
        match field.kind {
            FieldKind::Bit => bits.push(value % 2 == 1),
            FieldKind::Octet => out.put_u8(value as u8),
            FieldKind::Short => out.put_u16(value as u16),
            FieldKind::Long => out.put_u32(value as u32),
            FieldKind::LongLong | FieldKind::Timestamp => out.put_u64(value),
            FieldKind::ShortStr => {
                let text = format!("{}-{value}", field.name);
                out.put_u8(text.len() as u8);
                out.put_slice(text.as_bytes());
            }
            FieldKind::LongStr => {
                let text = format!("long {} {value}", field.name);
                out.put_u32(text.len() as u32);
                out.put_slice(text.as_bytes());
            }
            FieldKind::Table => {
                let table: FieldTable = [(
                    ShortStr::try_from(field.name).unwrap(),
                    FieldValue::I64(value as i64),
                )]
                .into_iter()
                .collect();
                write_table(&mut out, &table);
            }
        }
    }
    flush(&mut out, &mut bits);
    out.freeze()
}

#[test]
fn every_method_round_trips_byte_for_byte() {
    for info in METHOD_TABLE {
        for seed in 0..4 {
            let arguments = synthetic_arguments(info, seed);
            let mut reader = Reader::new(&arguments);
            let method = Method::decode_arguments(info.class_id, info.method_id, &mut reader)
                .unwrap_or_else(|e| panic!("{}.{}: {e}", info.class_name, info.method_name));
            assert_eq!(reader.remaining(), 0);
            assert_eq!(method.class_id(), info.class_id);
            assert_eq!(method.method_id(), info.method_id);
            assert_eq!(
                method.name(),
                format!("{}.{}", info.class_name, info.method_name)
            );
            assert_eq!(method.has_content(), info.has_content);

            let mut encoded = BytesMut::new();
            let mut writer = Writer::new(&mut encoded);
            method.encode_arguments(&mut writer);
            writer.finish();
            assert_eq!(&encoded[..], &arguments[..], "{}", method.name());

            // And as a whole frame.
            let mut frame = BytesMut::new();
            encode_method(&mut frame, 9, &method);
            let decoded = decode_frame(&mut frame, 0).unwrap().unwrap();
            assert_eq!(decoded, Frame::Method { channel: 9, method });
        }
    }
}

#[test]
fn every_method_truncated_anywhere_is_an_error_not_a_panic() {
    for info in METHOD_TABLE {
        let arguments = synthetic_arguments(info, 1);
        for cut in 0..arguments.len() {
            let truncated = arguments.slice(..cut);
            let mut reader = Reader::new(&truncated);
            let decoded = Method::decode_arguments(info.class_id, info.method_id, &mut reader);
            assert!(
                decoded.is_err(),
                "{}.{} decoded from {cut} of {} bytes",
                info.class_name,
                info.method_name,
                arguments.len()
            );
        }
    }
}

fn field_value_strategy() -> impl Strategy<Value = FieldValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        any::<u64>().prop_map(FieldValue::U64),
        // NaN != NaN, so compare only numbers that equal themselves.
        (-1e30f32..1e30).prop_map(FieldValue::F32),
        (-1e300f64..1e300).prop_map(FieldValue::F64),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value })),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|v| FieldValue::LongStr(LongStr::from(v))),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|v| FieldValue::Bytes(Bytes::from(v))),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
            proptest::collection::vec(("[a-z]{0,12}", inner), 0..6).prop_map(|entries| {
                FieldValue::Table(
                    entries
                        .into_iter()
                        .map(|(k, v)| (ShortStr::try_from(k).unwrap(), v))
                        .collect(),
                )
            }),
        ]
    })
}

proptest! {
    #[test]
    fn field_tables_round_trip(
        entries in proptest::collection::vec(("[a-zA-Z0-9-]{0,20}", field_value_strategy()), 0..10)
    ) {
        let table: FieldTable = entries
            .into_iter()
            .map(|(k, v)| (ShortStr::try_from(k).unwrap(), v))
            .collect();
        let mut out = BytesMut::new();
        write_table(&mut out, &table);
        let bytes = out.freeze();
        let mut reader = Reader::new(&bytes);
        prop_assert_eq!(reader.table().unwrap(), table);
        prop_assert_eq!(reader.remaining(), 0);
    }

    #[test]
    fn content_headers_round_trip(
        body_size in any::<u64>(),
        delivery_mode in proptest::option::of(any::<u8>()),
        priority in proptest::option::of(any::<u8>()),
        expiration in proptest::option::of("[0-9]{0,10}"),
        timestamp in proptest::option::of(any::<u64>()),
        headers in proptest::option::of(
            proptest::collection::vec(("[a-z]{1,8}", field_value_strategy()), 0..4)
        ),
    ) {
        let properties = BasicProperties {
            delivery_mode,
            priority,
            expiration: expiration.map(|e| ShortStr::try_from(e).unwrap()),
            timestamp,
            headers: headers.map(|h| h.into_iter().map(|(k, v)| (ShortStr::try_from(k).unwrap(), v)).collect()),
            ..Default::default()
        };
        let header = ContentHeader::new(body_size, properties);
        let mut out = BytesMut::new();
        encode_content_header(&mut out, 3, body_size, &header.raw_properties);
        let decoded = decode_frame(&mut out, 0).unwrap().unwrap();
        prop_assert_eq!(decoded, Frame::Header { channel: 3, header });
    }
}
