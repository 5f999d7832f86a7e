//! The word pipeline CHAIR runs on every caption before matching objects: NLTK-style tokenisation and
//! WordNet singularisation exactly as NLTK's `WordNetLemmatizer().lemmatize(word)` (noun): morphy's exception
//! list, then its suffix rules, keeping only candidates that are WordNet noun lemmas, the shortest winning.
//! The lemma list (single-word entries of WordNet 3.0's `index.noun`) ships in `data/wordnet/noun.lemmas`;
//! without it "vases" would become "vase" where NLTK picks the shorter lemma "vas" (and so misses the vase).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// morphy's noun suffix rules, in NLTK's order (`MORPHOLOGICAL_SUBSTITUTIONS[NOUN]`).
const NOUN_RULES: [(&str, &str); 9] = [
    ("s", ""),
    ("ses", "s"),
    ("ves", "f"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
];

/// Splits lower-cased text into words and punctuation the way NLTK's `word_tokenize` does where it matters
/// for CHAIR: punctuation is split off (and kept, so "hot, dog" is not "hot dog"), clitics start a token of
/// their own ("dog's" -> "dog", "'s"), while `-`, `/` and `.` between letters stay inside a word
/// ("t-shirt", "hot-dog", "cat/dog" are single tokens, as in NLTK).
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let chars: Vec<char> = lower.chars().collect();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if is_word(c) || is_apostrophe(c) && chars.get(i + 1).is_some_and(|&n| is_word(n)) {
            let start = i;
            i += 1;
            while i < chars.len() {
                let joined = matches!(chars[i], '-' | '/' | '.') && chars.get(i + 1).is_some_and(|&n| is_word(n));
                if is_word(chars[i]) || joined && i > start {
                    i += 1;
                } else {
                    break;
                }
            }
            tokens.push(chars[start..i].iter().collect());
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    tokens
}

fn is_apostrophe(c: char) -> bool {
    c == '\'' || c == '\u{2019}'
}

/// Noun singulariser: WordNet's exception list, then morphy's suffix rules; candidates are kept only when
/// they are WordNet noun lemmas, the shortest wins, and a word without known candidates is returned unchanged.
#[derive(Debug, Clone)]
pub struct Lemmatizer {
    exceptions: HashMap<String, Vec<String>>,
    known: HashSet<String>,
}

/// WordNet 3.0 noun exceptions (irregular plurals), `inflected lemma [lemma...]` per line.
pub const NOUN_EXCEPTIONS: &str = include_str!("../../data/wordnet/noun.exc");
/// WordNet 3.0 single-word noun lemmas, one per line.
pub const NOUN_LEMMAS: &str = include_str!("../../data/wordnet/noun.lemmas");

impl Lemmatizer {
    /// `noun_exc`: WordNet's `noun.exc` text; `noun_lemmas`: the noun lemmas, one per line.
    pub fn new(noun_exc: &str, noun_lemmas: &str) -> Self {
        let mut exceptions = HashMap::new();
        for line in noun_exc.lines() {
            let mut parts = line.split_whitespace();
            if let Some(inflected) = parts.next() {
                // A later line replaces an earlier one, as NLTK's dict does.
                exceptions.insert(inflected.to_string(), parts.map(str::to_string).collect());
            }
        }
        let known = noun_lemmas.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        Lemmatizer { exceptions, known }
    }

    /// The shipped WordNet 3.0 tables.
    pub fn wordnet() -> Self {
        Lemmatizer::new(NOUN_EXCEPTIONS, NOUN_LEMMAS)
    }

    /// The singular of `word` (NLTK `lemmatize(word, 'n')`).
    pub fn lemma<'a>(&self, word: &'a str) -> Cow<'a, str> {
        if let Some(bases) = self.exceptions.get(word) {
            let candidates = std::iter::once(word.to_string()).chain(bases.iter().cloned());
            return self.shortest_known(candidates).map_or(Cow::Borrowed(word), Cow::Owned);
        }
        let mut forms = apply_rules(&[word.to_string()]);
        if forms.is_empty() {
            return Cow::Borrowed(word); // no rule applies: morphy can only return the word itself
        }
        let first = std::iter::once(word.to_string()).chain(forms.iter().cloned());
        if let Some(found) = self.shortest_known(first) {
            return Cow::Owned(found);
        }
        // morphy keeps applying the rules until some form is known.
        while !forms.is_empty() {
            forms = apply_rules(&forms);
            if let Some(found) = self.shortest_known(forms.iter().cloned()) {
                return Cow::Owned(found);
            }
        }
        Cow::Borrowed(word)
    }

    /// Python's `min(candidates, key=len)` over the known ones: the first of the shortest.
    fn shortest_known(&self, candidates: impl Iterator<Item = String>) -> Option<String> {
        let mut best: Option<(usize, String)> = None;
        for c in candidates.filter(|c| self.known.contains(c)) {
            let len = c.chars().count(); // Python's len counts characters
            if best.as_ref().is_none_or(|(b, _)| len < *b) {
                best = Some((len, c));
            }
        }
        best.map(|(_, c)| c)
    }
}

fn apply_rules(forms: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for form in forms {
        for (old, new) in NOUN_RULES {
            if let Some(stem) = form.strip_suffix(old) {
                out.push(format!("{stem}{new}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_splits_punctuation_and_clitics() {
        assert_eq!(tokenize("A Dog, two cats."), ["a", "dog", ",", "two", "cats", "."]);
        assert_eq!(tokenize("the man's hot-dog"), ["the", "man", "'s", "hot-dog"]);
        assert_eq!(tokenize("cat/dog (e.g. 3)"), ["cat/dog", "(", "e.g", ".", "3", ")"]);
        assert_eq!(tokenize("end.\n\nNext"), ["end", ".", "next"]);
        assert_eq!(tokenize("  "), Vec::<String>::new());
    }

    fn lemmatizer(known: &[&str]) -> Lemmatizer {
        let exc = "children child\nmice mouse\nknives knife\nmen man\naxes ax axis\n";
        Lemmatizer::new(exc, &known.join("\n"))
    }

    #[test]
    fn exceptions_then_rules_then_shortest() {
        let l = lemmatizer(&["child", "mouse", "knife", "man", "bus", "dog", "puppy", "glass", "glasses"]);
        assert_eq!(l.lemma("children"), "child");
        assert_eq!(l.lemma("mice"), "mouse");
        assert_eq!(l.lemma("knives"), "knife");
        assert_eq!(l.lemma("men"), "man");
        assert_eq!(l.lemma("buses"), "bus"); // "ses" -> "s"; "buse" is unknown
        assert_eq!(l.lemma("bus"), "bus"); // known as is; "bu" is not
        assert_eq!(l.lemma("dogs"), "dog");
        assert_eq!(l.lemma("puppies"), "puppy"); // "ies" -> "y"
        assert_eq!(l.lemma("glasses"), "glass"); // both known: the shorter wins
        assert_eq!(l.lemma("unicorns"), "unicorns"); // nothing known: unchanged
        assert_eq!(l.lemma("axes"), "axes"); // exception bases unknown: unchanged
    }

    #[test]
    fn shipped_wordnet_reproduces_nltk_quirks() {
        let l = Lemmatizer::wordnet();
        assert_eq!(l.lemma("people"), "people");
        assert_eq!(l.lemma("skis"), "ski");
        assert_eq!(l.lemma("sports"), "sport");
        assert_eq!(l.lemma("vases"), "vas"); // WordNet knows "vas"; NLTK returns the shortest lemma
        assert_eq!(l.lemma("bikers"), "bikers"); // "biker" is not a WordNet lemma
        assert_eq!(l.lemma("scissors"), "scissors");
        assert_eq!(l.lemma("is"), "is"); // noun.exc says "is is", and "is" is no lemma: unchanged
        assert_eq!(l.lemma("this"), "this");
        // "men" and "man" are both lemmas of length 3: Python's min keeps the first, "men".
        assert_eq!(l.lemma("men"), "men");
        assert_eq!(l.lemma("women"), "woman");
    }

    #[test]
    fn rules_are_reapplied_until_a_form_is_known() {
        // "busses" -> {"busse", "buss"} (unknown) -> "buss" -> "bus"
        let l = lemmatizer(&["bus"]);
        assert_eq!(l.lemma("busses"), "bus");
    }
}
