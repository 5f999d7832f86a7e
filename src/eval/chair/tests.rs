//! Hand-checked CHAIR cases: each expected mention and metric below is worked out from the rules in the
//! module doc.

use super::*;

fn chair() -> Chair {
    Chair::builtin().unwrap()
}

/// (word, category) pairs of a caption's mentions.
fn found(caption: &str) -> Vec<(String, String)> {
    chair().mentions(caption).into_iter().map(|m| (m.word, m.category)).collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected.iter().map(|(w, c)| (w.to_string(), c.to_string())).collect()
}

#[test]
fn plurals_and_irregular_plurals_are_singularised() {
    assert_eq!(
        found("Two people and three children watch the mice near some knives and dogs."),
        // "people" is itself a synonym; children/mice/knives come from WordNet's exception list.
        pairs(&[("people", "person"), ("child", "person"), ("mouse", "mouse"), ("knife", "knife"), ("dog", "dog")])
    );
    // NLTK keeps "men" (a WordNet lemma as long as "man"), so the official pipeline never counts it.
    assert_eq!(
        found("Buses, men, women and puppies."),
        pairs(&[("bus", "bus"), ("woman", "person"), ("puppy", "dog")])
    );
}

#[test]
fn two_word_names_merge() {
    assert_eq!(
        found("A hot dog, a Teddy Bear and two cell phones."),
        pairs(&[("hot dog", "hot dog"), ("teddy bear", "teddy bear"), ("cell phone", "cell phone")])
    );
    // Punctuation between the words prevents the merge; "hot" alone is no object.
    assert_eq!(found("It is hot, dog."), pairs(&[("dog", "dog")]));
    // A hyphenated form is one token, as in NLTK, and matches nothing.
    assert_eq!(found("a hot-dog"), pairs(&[]));
    // "sports balls" -> "sport ball" (WordNet knows "sport", not "sports"): no merge, but "ball" is a synonym.
    assert_eq!(found("sports balls"), pairs(&[("ball", "sports ball")]));
}

#[test]
fn special_rules_for_animals_vehicles_ties_and_toilets() {
    assert_eq!(
        found("A baby elephant next to an adult giraffe and a baby."),
        pairs(&[("elephant", "elephant"), ("giraffe", "giraffe"), ("baby", "person")])
    );
    assert_eq!(found("a passenger train on the train tracks"), pairs(&[("train", "train")]));
    assert_eq!(found("a man in a bow tie"), pairs(&[("man", "person"), ("tie", "tie")]));
    // "toilet seat" -> toilet, and any other "seat" is dropped once a toilet is mentioned.
    assert_eq!(found("The toilet seat is up; a seat is near it."), pairs(&[("toilet", "toilet")]));
    assert_eq!(found("a seat near a table"), pairs(&[("seat", "chair"), ("table", "dining table")]));
}

#[test]
fn synonyms_map_to_their_category() {
    assert_eq!(
        found("A puppy chases a kitten past the sofa, the fridge and a motorbike."),
        pairs(&[
            ("puppy", "dog"),
            ("kitten", "cat"),
            ("sofa", "couch"),
            ("fridge", "refrigerator"),
            ("motorbike", "motorcycle")
        ])
    );
    // Capitalised list entries never match lower-cased captions (as in the official script).
    assert_eq!(found("an iPhone"), pairs(&[]));
}

fn caption(id: &str, image: &str, text: &str) -> Caption {
    Caption { id: id.into(), image_id: image.into(), text: text.into(), origin: None }
}

fn truth(rows: &[(&str, &[&str])]) -> GroundTruth {
    let objects =
        rows.iter().map(|(img, objs)| (img.to_string(), objs.iter().map(|o| o.to_string()).collect())).collect();
    GroundTruth { objects, source: "test".into() }
}

#[test]
fn metrics_match_a_hand_count() {
    let gt =
        truth(&[("1", &["person", "dog", "couch"]), ("2", &["toilet", "sink"]), ("3", &["elephant"]), ("4", &["car"])]);
    let caps = [
        // man, dog, sofa (all true), cat (hallucinated): 13 words
        caption("a", "1", "A man and his dogs sit on a sofa next to a cat."),
        // toilet, sink: 8 words
        caption("b", "2", "A white toilet seat next to the sink."),
        // elephant, elephant (adult elephants), hot dog (hallucinated): 11 words
        caption("c", "3", "A baby elephant with two adult elephants and a hot dog."),
        // nothing: 3 words
        caption("d", "4", "A sunny street."),
    ];
    let out = chair().score(&caps, &gt).unwrap();
    let r = &out.report;
    assert_eq!((r.captions, r.captions_with_objects, r.hallucinated_captions), (4, 3, 2));
    assert_eq!((r.mentions, r.hallucinated_mentions), (9, 2));
    assert_eq!(r.chair_s, 2.0 / 4.0);
    assert_eq!(r.chair_i, 2.0 / 9.0);
    assert_eq!(r.response_hallucination, 2.0 / 3.0);
    assert_eq!((r.recalled_objects, r.ground_truth_objects), (6, 7));
    assert_eq!(r.object_recall, 6.0 / 7.0);
    assert_eq!(r.avg_length, 35.0 / 4.0);
    assert!(r.warnings.is_empty());
    let c = &out.details[2];
    assert_eq!(c.hallucinated, vec![Mention { word: "hot dog".into(), category: "hot dog".into() }]);
    assert_eq!(c.chair_i, 1.0 / 3.0);
    assert_eq!(out.details[0].recalled, ["couch", "dog", "person"]);
}

#[test]
fn empty_inputs_give_zeros_and_warnings() {
    let r = chair().score(&[], &truth(&[])).unwrap().report;
    assert_eq!((r.chair_s, r.chair_i, r.response_hallucination, r.object_recall), (0.0, 0.0, 0.0, 0.0));
    assert_eq!(r.warnings.len(), 5);
}

#[test]
fn unknown_images_and_duplicate_ids_are_errors() {
    let gt = truth(&[("1", &["dog"])]);
    let err = chair().score(&[caption("a", "2", "a dog")], &gt).unwrap_err().to_string();
    assert!(err.contains("image \"2\" has no ground truth in test"), "{err}");
    let dup = [caption("a", "1", "a dog"), caption("a", "1", "a cat")];
    assert!(chair().score(&dup, &gt).is_err());
}

#[test]
fn custom_synonym_lists_replace_the_builtin_one() {
    let c = Chair::new("circle, ring, round thing\nsquare, box\n", Lemmatizer::wordnet()).unwrap();
    assert_eq!(c.categories(), ["circle", "square"]);
    let m: Vec<String> =
        c.mentions("Two rings, a round thing and boxes; no dog.").into_iter().map(|m| m.category).collect();
    assert_eq!(m, ["circle", "circle", "square"]);
    assert!(Chair::new("\n\n", Lemmatizer::wordnet()).is_err());
}

#[test]
fn ground_truth_objects_accept_any_synonym() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gt.jsonl");
    std::fs::write(&path, "{\"image_id\": 7, \"objects\": [\"dogs\", \"teddy bear\", \"sofa\", \"iPhone\"]}\n")
        .unwrap();
    let gt = GroundTruth::from_jsonl(&path, &chair()).unwrap();
    let cats: Vec<&str> = gt.objects["7"].iter().map(String::as_str).collect();
    assert_eq!(cats, ["cell phone", "couch", "dog", "teddy bear"]);
    std::fs::write(&path, "{\"image_id\": 7, \"objects\": [\"dog\"]}\n{\"image_id\": 8, \"objects\": [\"unicorn\"]}\n")
        .unwrap();
    let err = GroundTruth::from_jsonl(&path, &chair()).unwrap_err().to_string();
    assert!(err.ends_with("gt.jsonl:2: object \"unicorn\" is not in the CHAIR synonym list"), "{err}");
}
