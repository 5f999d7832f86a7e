#!/usr/bin/env python3
"""Regenerate tests/fixtures/judge/ (dev-only; tests never run this) and print the numbers tests/judge.rs expects.

Runs the official judged-benchmark scripts, unmodified, on small fixtures with a stub OpenAI client that replays
fixed replies and records each request:
  - MM-Vet: yuweihao/MM-Vet mm-vet_evaluator.py @ acde843e02da (functions `runs` and `export_result`, num_run=3)
  - LLaVA-Bench: haotian-liu/LLaVA @ c121f0432da2 llava/eval/eval_gpt_review_bench.py (as __main__, with
    llava/eval/table/rule.json) and llava/eval/summarize_gpt_review.py -f
  - MMHal-Bench: llava-rlhf/LLaVA-RLHF @ 830a083fd83e Eval/eval_gpt_mmhal.py (as __main__)
Needs numpy and pandas (measured with numpy 2.4.6, pandas 3.1.1); `openai` and `tqdm` are stubbed.

Usage: python3 scripts/make_judge_fixtures.py --mmvet MM-Vet/mm-vet_evaluator.py --llava LLaVA/llava/eval \
  --mmhal LLaVA-RLHF/Eval/eval_gpt_mmhal.py [--out tests/fixtures/judge]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types


def stub_modules(chat_completion):
    class RateLimitError(Exception):
        pass
    openai = types.ModuleType("openai")
    openai.OpenAI = object
    openai.ChatCompletion = chat_completion
    openai.error = types.SimpleNamespace(RateLimitError=RateLimitError)
    exceptions = types.ModuleType("openai._exceptions")
    exceptions.RateLimitError = RateLimitError
    openai._exceptions = exceptions
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = lambda x, **k: x
    sys.modules.update({"openai": openai, "openai._exceptions": exceptions, "tqdm": tqdm})


def run_main(path, argv):
    sys.argv = [path] + argv
    exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__"})


MMVET_DATA = {
    "v1_0": {"imagename": "v1_0.png", "capability": ["rec", "know"], "question": "What is the animal?", "answer": "cat <OR> kitten"},
    "v1_1": {"imagename": "v1_1.png", "capability": ["ocr", "math"], "question": "What is x in the equation?", "answer": "-1 <AND> -5"},
    "v1_2": {"imagename": "v1_2.jpg", "capability": ["rec"], "question": "Which fruit is shown?", "answer": "apple"},
    "v1_3": {"imagename": "v1_3.jpg", "capability": ["ocr"], "question": "What does the sign say?", "answer": "STOP"},
    "v1_4": {"imagename": "v1_4.jpg", "capability": ["know", "rec"], "question": "Who painted this?", "answer": "Vincent van Gogh"},
    "v1_5": {"imagename": "v1_5.png", "capability": ["ocr", "spat", "math"], "question": "What is the total price?", "answer": "$12.50"},
}
MMVET_PREDS = {"v1_0": "a cat", "v1_1": "x = -1", "v1_2": "a pear", "v1_3": "stop", "v1_4": "Monet", "v1_5": "The total is 12.5 dollars."}
# Replies per question in the order the grader asks (runs 0, 1, 2 in turn); tests/judge.rs replays the same.
MMVET_REPLIES = {
    "v1_0": ["0.5", "0.6", "0.5"],
    "v1_1": ["1.0", "The answer", "0.8", "1.0"],
    "v1_2": ["0.0", "0.0", "0.0"],
    "v1_3": ["1.5", "0.3", " 0.7", "0.7", "0.9 because"],
    "v1_4": ["N/A", "N/A", "", "-0.1", "abc", "0.9", "0.2", "0.25"],
    "v1_5": ["0.1", "1", "0.4\n"],
}


def mmvet(evaluator, out):
    stub_modules(None)
    spec = importlib.util.spec_from_file_location("mmvet_evaluator", evaluator)
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    queues = {k: list(v) for k, v in MMVET_REPLIES.items()}
    requests = []

    class Completions:
        def create(self, model, max_tokens, temperature, messages):
            text = messages[0]["content"]
            row = text[: -len("\nPredict the correctness of the answer (digit): ")] if text.endswith("(digit): ") else text
            row = row.split("\n")[-1]
            qid = [k for k, p in MMVET_PREDS.items() if row.endswith("| " + p + " | ")][0]
            requests.append((qid, dict(model=model, max_tokens=max_tokens, temperature=temperature, messages=messages)))
            reply = types.SimpleNamespace(message=types.SimpleNamespace(content=queues[qid].pop(0)))
            return types.SimpleNamespace(model=model, choices=[reply])

    ev.client = types.SimpleNamespace(chat=types.SimpleNamespace(completions=Completions()))
    with tempfile.TemporaryDirectory() as d:
        json.dump(MMVET_DATA, open(os.path.join(d, "mm-vet.json"), "w"))
        json.dump(MMVET_PREDS, open(os.path.join(d, "results.json"), "w"))
        args = types.SimpleNamespace(mmvet_path=d, result_file=os.path.join(d, "results.json"), result_path=d,
                                     gpt_model="gpt-4-0613", prompt=ev.prompt, use_sub_set=False, decimal_places=1, num_run=3)
        (sub_set, _, data, counter, cap_set_list, cap_set_counter, len_data, df, df2, cap_set_names) = ev.load_metadata(args)
        for k, v in dict(sub_set=sub_set, counter=counter, cap_set_list=cap_set_list, len_data=len_data,
                         cap_score_file=os.path.join(d, "cap.csv"), cap_int_score_file=os.path.join(d, "cap-int.csv")).items():
            setattr(ev, k, v)
        grades = ev.runs(args, os.path.join(d, "grade.json"), data, len_data, sub_set)
        df, df2 = ev.export_result(args, "fixture", df, df2, grades, data, cap_set_counter, cap_set_names)
    json.dump(MMVET_DATA, open(os.path.join(out, "mm-vet.json"), "w"))
    json.dump(MMVET_PREDS, open(os.path.join(out, "mmvet-results.json"), "w"))
    json.dump([r for q, r in requests if q == "v1_1"][0], open(os.path.join(out, "mmvet-request-v1_1.json"), "w"), indent=1)
    json.dump([r for q, r in requests if q == "v1_4"][1], open(os.path.join(out, "mmvet-retry-v1_4.json"), "w"), indent=1)
    print(df.to_string(), df2.to_string(), sep="\n")


def llava(eval_dir, out):
    captured = []

    class ChatCompletion:
        @staticmethod
        def create(model, messages, temperature, max_tokens):
            captured.append(messages)
            return {"choices": [{"message": {"content": "8 9"}}]}

    stub_modules(ChatCompletion)
    cats = ["conv", "conv", "detail", "detail", "complex", "complex", "complex"]
    imgs = ["001.jpg", "001.jpg", "002.jpg", "001.jpg", "003.jpg", "002.jpg", "003.jpg"]
    files = {name: os.path.join(out, "llava-" + name + ".jsonl") for name in ["questions", "context", "references", "answers"]}
    with open(files["questions"], "w") as f:
        for i in range(7):
            f.write(json.dumps({"image": imgs[i], "text": "Question %d about {the} image?" % i, "category": cats[i], "question_id": i}) + "\n")
    with open(files["context"], "w") as f:
        f.write(json.dumps({"id": "a", "image": "001.jpg", "caption": ["A dog on a sofa.", "A brown dog lies on a red sofa."]}) + "\n")
        f.write(json.dumps({"id": "b", "image": "002.jpg", "caption": "A street at night."}) + "\n")
        f.write(json.dumps({"id": "c", "image": "003.jpg", "caption": ["Two cups of coffee."]}) + "\n")
    for name, who in [("references", "Reference"), ("answers", "Model")]:
        with open(files[name], "w") as f:
            for i in range(7):
                f.write(json.dumps({"question_id": i, "prompt": "", "text": "%s answer %d." % (who, i), "answer_id": "%s%d" % (name, i), "model_id": who, "metadata": {}}) + "\n")
    with tempfile.TemporaryDirectory() as d:
        run_main(os.path.join(eval_dir, "eval_gpt_review_bench.py"),
                 ["-q", files["questions"], "-c", files["context"], "-a", files["references"], files["answers"],
                  "-r", os.path.join(eval_dir, "table", "rule.json"), "-o", os.path.join(d, "review.jsonl")])
        json.dump(captured[0], open(os.path.join(out, "llava-request-0.json"), "w"), indent=1)
        # The summary on fixed reviews (parsed by the script's own parse_score).
        spec = importlib.util.spec_from_file_location("review_bench", os.path.join(eval_dir, "eval_gpt_review_bench.py"))
        rb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rb)
        reviews = ["8 9\nok", "7 6", "9 7\nexpl", "Assistant 1: 8", "8 8", "10 7.5", "6,9"]
        with open(os.path.join(d, "reviews.jsonl"), "w") as f:
            for i, (cat, review) in enumerate(zip(cats, reviews)):
                f.write(json.dumps({"question_id": i, "category": "llava_bench_" + cat, "content": review, "tuple": rb.parse_score(review)}) + "\n")
        print(subprocess.run([sys.executable, os.path.join(eval_dir, "summarize_gpt_review.py"), "-f", os.path.join(d, "reviews.jsonl")],
                             capture_output=True, text=True).stdout)


MMHAL_REPLIES = ["Explanation.\nRating: 6, very informative", "rating: 5", "RATING: 4", "Rating: 3",
                 "Rating: 2, very informative, with hallucination", "Rating: 1", "Rating: 0", "No rating here",
                 "Rating: 2 ... or maybe Rating: 4", "rating:5", "Rating: 60"]


def mmhal(script, out):
    types_ = ["attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other"]
    records = [{"question_type": types_[i % 8], "question_topic": "t", "image_id": str(i), "image_src": "https://x/%d.jpg" % i,
                "image_content": ["Cat", "Dog"], "question": "Q%d?" % i, "gt_answer": "A%d." % i, "model_answer": "M%d." % i} for i in range(96)]
    path = os.path.join(out, "mmhal-records.json")
    json.dump(records, open(path, "w"))
    captured = []

    class ChatCompletion:
        @staticmethod
        def create(model, messages, temperature):
            captured.append(dict(model=model, messages=messages, temperature=temperature))
            i = int(messages[0]["content"].split("### Question\nQ")[1].split("?")[0])
            return {"choices": [{"message": {"content": MMHAL_REPLIES[(i * 7) % len(MMHAL_REPLIES)]}}]}

    stub_modules(ChatCompletion)
    import time
    time.sleep = lambda s: None
    run_main(script, ["--response", path, "--api-key", "unused"])
    json.dump(captured[0], open(os.path.join(out, "mmhal-request-0.json"), "w"), indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mmvet", required=True)
    p.add_argument("--llava", required=True, help="LLaVA's llava/eval folder")
    p.add_argument("--mmhal", required=True)
    p.add_argument("--out", default="tests/fixtures/judge")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    mmvet(a.mmvet, a.out)
    llava(a.llava, a.out)
    mmhal(a.mmhal, a.out)
