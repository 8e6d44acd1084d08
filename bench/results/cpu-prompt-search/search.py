"""The prompt search behind --prompt-style (a record of how greedy.jsonl and sampled.jsonl were made).

    python search.py greedy 48 200 cur,short,shot,shotturn,sys    # greedy, first 48 SVAMP train problems
    python search.py sampled 32 200 shot,cur                      # G = 8 samples at temperature 0.7, seed 0

'cur' is --prompt-style zero_shot and 'shot' is --prompt-style one_shot; the other three were not kept.
"""
import json
import sys
import time

import torch

from rlfuse.engine.data import ONE_SHOT_ANSWER, ONE_SHOT_QUESTION, load_examples, prompt_text
from rlfuse.engine.model import load_model_and_tokenizer
from rlfuse.engine.rewards import ANSWER_LINE_STOP, gsm8k_rewards
from rlfuse.engine.rollout import batch_truncated
from rlfuse.engine.sampler import SharedPrefixSampler

ASK = "Solve step by step and end with a line '#### <number>'."
PROMPTS = {
    "cur": lambda q: [{"role": "user", "content": prompt_text(q, "zero_shot")}],
    "short": lambda q: [{"role": "user", "content": f"{q}\nThink step by step, then give the final answer on a "
                                                    "last line as '#### <number>'."}],
    "shot": lambda q: [{"role": "user", "content": prompt_text(q, "one_shot")}],
    "shotturn": lambda q: [{"role": "user", "content": f"{ONE_SHOT_QUESTION}\n{ASK}"},
                           {"role": "assistant", "content": ONE_SHOT_ANSWER},
                           {"role": "user", "content": f"{q}\n{ASK}"}],
    "sys": lambda q: [{"role": "system", "content": "You solve math word problems. Reason step by step, then write "
                                                    "the final answer on its own last line as '#### <number>'."},
                      {"role": "user", "content": q}],
}


def main(mode: str, num: int, max_new_tokens: int, names: str) -> None:
    torch.set_num_threads(2)
    model, tok = load_model_and_tokenizer("smollm2-135m", torch.float32, "cpu")
    examples = load_examples("svamp", "train")[:num]
    sampler = SharedPrefixSampler(model, tok, stop_pattern=ANSWER_LINE_STOP)
    G, chunk = (1, 16) if mode == "greedy" else (8, 8)
    for name in names.split(","):
        torch.manual_seed(0)
        start = time.time()
        prompts = [tok(tok.apply_chat_template(PROMPTS[name](ex.question), add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False)["input_ids"]
                   for ex in examples]
        texts, lens, cut = [], [], []
        for i in range(0, num, chunk):
            batch = sampler.generate(prompts[i:i + chunk], G, max_new_tokens, 0.7 if G > 1 else 1.0, greedy=G == 1)
            texts += tok.batch_decode(batch.completion_ids, skip_special_tokens=True)
            lens += batch.completion_mask.sum(1).tolist()
            cut += batch_truncated(batch, sampler.stop_ids).tolist()
        scored = gsm8k_rewards(texts, [ex.gold for ex in examples for _ in range(G)], truncated=cut)
        ok = [c and not t for c, t in zip(scored.correct, cut)]
        per = [sum(ok[i * G:(i + 1) * G]) for i in range(num)]
        print(json.dumps({"prompt": name, "N": num, "G": G, "correct": sum(ok), "sample_acc": sum(ok) / len(ok),
                          "groups_mixed": sum(0 < p < G for p in per), "fmt": sum(scored.formatted) / len(ok),
                          "trunc": sum(cut) / len(ok), "len": sum(lens) / len(lens),
                          "s": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
