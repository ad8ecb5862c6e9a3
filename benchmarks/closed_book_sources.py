"""
Can the embedded generator check a source's fact? Ask it every source question of the labelled purge-mix pairs
closed-book and compare its answer with the source's (every content word of the source's answer, numbers as digits,
must appear in the model's). Writes one JSON line per distinct source and prints the agreement count.

    python benchmarks/closed_book_sources.py --out benchmarks/results/closed_book_sources.jsonl
"""

import argparse
import json
import re

from token_clean_trainer.assets import embedded_gguf_path

LABELLED = (
    "tests/data/purge_mix_gold.jsonl",
    "benchmarks/results/purge_mix_qwen_coder_accepted_labelled.jsonl",
)
SYSTEM = (
    "Answer the question from your own knowledge in as few words as possible. "
    "If it is not a factual question, answer 'n/a'."
)
NUMBERS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
STOP = set("the a an of and or in on at to is are was were it its by for with as from that this which".split())


def content_words(text: str) -> set[str]:
    text = text.lower().replace("twenty-four", "24").replace("\u2019", "'")
    return {NUMBERS.get(w, w) for w in re.findall(r"[a-z0-9]+", text) if w not in STOP}


def agrees(source_answer: str, model_answer: str) -> bool:
    words = content_words(source_answer)
    return bool(words) and words <= content_words(model_answer)


def main() -> None:
    from llama_cpp import Llama

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/closed_book_sources.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sources = {}
    for path in LABELLED:
        for line in open(path, encoding="utf-8"):
            for source in json.loads(line)["sources"]:
                sources[source["instruction"]] = source["response"]
    llm = Llama(model_path=embedded_gguf_path("qwen2.5-coder-1.5b"), n_ctx=1024, n_threads=args.threads, verbose=False)
    agreed = 0
    with open(args.out, "w", encoding="utf-8") as out:
        for question, answer in sources.items():
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=24)
            model_answer = reply["choices"][0]["message"]["content"]
            agree = agrees(answer, model_answer)
            agreed += agree
            out.write(
                json.dumps({"question": question, "source": answer, "model": model_answer, "agrees": agree}) + "\n"
            )
    print(f"{agreed} of {len(sources)} source answers agreed with the model's closed-book answer")


if __name__ == "__main__":
    main()
