# The fixture tokenizer's encode of ~1000-token bench-like fillers on this host: whole, and split at spaces
# into k chunks encoded in parallel (encode_batch), with the ids compared.
import os, random, statistics, time, platform
from tokenizers import Tokenizer
tok = Tokenizer.from_file("tests/fixtures/tokenizer/tokenizer.json")
SYL = ["ka","lo","ren","ti","sol","mar","en","vi","do","ra","qui","ne","tor","la","mi","sen","pa","ro","ve","lin","cor","da","ul","fe"]
rng = random.Random(5)
def filler(words):
    s = []
    for w in range(words):
        if w: s.append("\n" if rng.randrange(12) == 0 else " ")
        s.append("".join(rng.choice(SYL) for _ in range(1 + rng.randrange(3))))
        if rng.randrange(9) == 0: s.append(",")
    return "".join(s)
def split(text, k):
    cuts = [0]
    for i in range(1, k):
        j = text.find(" ", len(text) * i // k)
        if j > cuts[-1]: cuts.append(j)
    cuts.append(len(text))
    parts = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    return [parts[0]] + [p[1:] for p in parts[1:]]
texts = []
for i in range(20):
    t = filler(900)
    enc = tok.encode(t, add_special_tokens=False)
    texts.append(t[: enc.offsets[999][1]])
print("host:", platform.processor() or platform.machine(), "cpus", os.cpu_count())
def med(f, n=7):
    xs = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1e3
whole = [med(lambda: tok.encode(t)) for t in texts]
print(f"encode whole: median {statistics.median(whole):.3f} ms, min {min(whole):.3f} ({len(tok.encode(texts[0]).ids)} ids)")
for k in (2, 4, 8):
    same = all(tok.encode(t).ids == [1] + sum((e.ids for e in tok.encode_batch(split(t, k), add_special_tokens=False)), []) for t in texts)
    tb = [med(lambda: tok.encode_batch(split(t, k), add_special_tokens=False)) for t in texts]
    print(f"encode_batch of {k} chunks: median {statistics.median(tb):.3f} ms, min {min(tb):.3f}; same ids: {same}")
