/* edgepack-chat: the bundle's model from C, with no Python. Built by edgepack for the bundle's target; the same
 * source builds with native/CMakeLists.txt or with pkg-config (native/README.md in the bundle's README).
 *
 *   native/edgepack-chat --prompt "Write a haiku about the sea."          streams the reply
 *   native/edgepack-chat --prompt "..." --json                            one JSON document, run.py's keys
 *   native/edgepack-chat --smoke                                          the bundle's golden check, one JSON line
 *
 * It finds its libraries beside itself (RUNPATH $ORIGIN; libonnxruntime.so.1 is linked, so onnxruntime-genai
 * uses the copy already loaded) and the model in ../model, or --model DIR. Greedy decoding gives the tokens
 * run.py gives for the same prompt. Exit codes: 0 done, 1 failed (the model did not load, the prompt does not
 * fit, a smoke check failed), 2 bad arguments; with --smoke, 2 also when the model cannot load, as smoke_test.py.
 */
#define _GNU_SOURCE
#include "edgepack_bundle.h"
#include "edgepack_oga.h"

#define EDGEPACK_RUNTIME "onnxruntime-genai " EDGEPACK_OGA_VERSION
#include "edgepack_util.h"

/* prints the error of a failed call and frees it; returns 1 when there was one */
static int failed(OgaResult* r, const char* what) {
  if (!r) return 0;
  fprintf(stderr, "error: %s: %s\n", what, OgaResultGetError(r));
  OgaDestroyResult(r);
  return 1;
}

typedef struct {
  OgaModel* model;
  OgaTokenizer* tokenizer;
} Loaded;

static int load(const Args* a, Loaded* out) {
  OgaConfig* config = NULL;
  const char* dir = model_dir(a);
  if (failed(OgaCreateConfig(dir, &config), "cannot read the model's genai_config.json")) {
    fprintf(stderr, "  (model folder: %s; pass --model DIR where the model is elsewhere)\n", dir);
    return 0;
  }
  if (a->threads > 0) {
    char overlay[160];
    snprintf(overlay, sizeof overlay,
             "{\"model\": {\"decoder\": {\"session_options\": {\"intra_op_num_threads\": %d, "
             "\"inter_op_num_threads\": 1}}}}",
             a->threads);
    if (failed(OgaConfigOverlay(config, overlay), "cannot set the thread count")) return 0;
  }
  int ok = !failed(OgaCreateModelFromConfig(config, &out->model), "cannot load the model") &&
           !failed(OgaCreateTokenizer(out->model, &out->tokenizer), "cannot load the tokenizer");
  OgaDestroyConfig(config);
  return ok;
}

/* the prompt's token ids: the chat template applied (unless --raw), then encoded; caller frees */
static int32_t* prepare(const Args* a, const Loaded* m, size_t* count) {
  const char* text = a->prompt;
  const char* templated = NULL;
  if (!a->raw) {
    Buf messages = {0};
    buf_str(&messages, "[");
    if (a->system) {
      buf_str(&messages, "{\"role\": \"system\", \"content\": ");
      buf_json(&messages, a->system);
      buf_str(&messages, "}, ");
    }
    buf_str(&messages, "{\"role\": \"user\", \"content\": ");
    buf_json(&messages, a->prompt);
    buf_str(&messages, "}]");
    OgaResult* r = OgaTokenizerApplyChatTemplate(m->tokenizer, NULL, messages.data, NULL, true, &templated);
    free(messages.data);
    if (failed(r, "cannot apply the chat template")) return NULL;
    text = templated;
  }
  OgaSequences* seqs = NULL;
  int32_t* ids = NULL;
  if (!failed(OgaCreateSequences(&seqs), "out of memory") &&
      !failed(OgaTokenizerEncode(m->tokenizer, text, seqs), "cannot tokenize the prompt")) {
    *count = OgaSequencesGetSequenceCount(seqs, 0);
    ids = malloc((*count ? *count : 1) * sizeof *ids);
    if (ids) memcpy(ids, OgaSequencesGetSequenceData(seqs, 0), *count * sizeof *ids);
  }
  OgaDestroySequences(seqs);
  if (templated) OgaDestroyString(templated);
  return ids;
}

typedef struct {
  Buf text;
  int32_t* tokens;
  int n, max_new;
  double prefill_ms, tokens_per_s;
  const char* stopped;
} Reply;

/* greedy (or sampled) tokens after ids; streams each piece to stdout when stream is set. With `forced`, the first
 * n_forced steps are teacher-forced: out->tokens has the model's pick, and where it is not forced[i] the generator
 * goes back one token and continues from forced[i] (so every step is scored after the recorded reply) */
static int generate(const Args* a, const Loaded* m, const int32_t* ids, size_t n_ids, int asked, int stream,
                    const int32_t* forced, size_t n_forced, Reply* out) {
  int max_new = asked;
  if (EDGEPACK_CONTEXT_LENGTH && (long)n_ids >= EDGEPACK_CONTEXT_LENGTH) {
    fprintf(stderr,
            "error: the prompt is %zu tokens; this bundle's context holds %d (prompt + reply). Shorten the prompt "
            "or build with a longer runtime.context_length.\n",
            n_ids, EDGEPACK_CONTEXT_LENGTH);
    return 0;
  }
  if (EDGEPACK_CONTEXT_LENGTH && (long)n_ids + max_new > EDGEPACK_CONTEXT_LENGTH)
    max_new = EDGEPACK_CONTEXT_LENGTH - (int)n_ids;
  out->tokens = calloc((size_t)max_new, sizeof *out->tokens);
  out->max_new = max_new;
  OgaGeneratorParams* params = NULL;
  OgaGenerator* gen = NULL;
  OgaTokenizerStream* tstream = NULL;
  int ok = 0;
  if (!out->tokens || failed(OgaCreateGeneratorParams(m->model, &params), "cannot make generator params") ||
      failed(OgaGeneratorParamsSetSearchNumber(params, "max_length", (double)(n_ids + (size_t)max_new)),
             "max_length") ||
      failed(OgaGeneratorParamsSetSearchBool(params, "do_sample", a->sample != 0), "do_sample"))
    goto done;
  if (a->sample && (failed(OgaGeneratorParamsSetSearchNumber(params, "temperature", a->temperature), "temperature") ||
                    failed(OgaGeneratorParamsSetSearchNumber(params, "top_p", a->top_p), "top_p") ||
                    failed(OgaGeneratorParamsSetSearchNumber(params, "top_k", a->top_k), "top_k") ||
                    (a->has_seed &&
                     failed(OgaGeneratorParamsSetSearchNumber(params, "random_seed", a->seed), "random_seed"))))
    goto done;
  if (failed(OgaCreateGenerator(m->model, params, &gen), "cannot make a generator") ||
      failed(OgaCreateTokenizerStream(m->tokenizer, &tstream), "cannot make a tokenizer stream"))
    goto done;
  double t0 = now_s(), t_first = 0;
  if (failed(OgaGenerator_AppendTokens(gen, ids, n_ids), "prefill failed")) goto done;
  while (!OgaGenerator_IsDone(gen) && out->n < max_new) {
    const int32_t* next = NULL;
    size_t count = 0;
    const char* piece = NULL;
    if (failed(OgaGenerator_GenerateNextToken(gen), "decoding failed") ||
        failed(OgaGenerator_GetNextTokens(gen, &next, &count), "decoding failed") || count < 1)
      goto done;
    if (!out->n) t_first = now_s();
    out->tokens[out->n++] = next[0];
    if ((size_t)out->n <= n_forced && next[0] != forced[out->n - 1] &&
        (failed(OgaGenerator_RewindTo(gen, n_ids + (size_t)out->n - 1), "rewind failed") ||
         failed(OgaGenerator_AppendTokens(gen, &forced[out->n - 1], 1), "teacher forcing failed")))
      goto done;
    if (failed(OgaTokenizerStreamDecode(tstream, next[0], &piece), "detokenizing failed")) goto done;
    buf_str(&out->text, piece ? piece : "");
    if (stream && piece) {
      fputs(piece, stdout);
      fflush(stdout);
    }
  }
  double t_end = now_s();
  if (!out->n) t_first = t_end;
  out->prefill_ms = (t_first - t0) * 1000.0;
  out->tokens_per_s = out->n > 1 && t_end > t_first ? (out->n - 1) / (t_end - t_first) : -1;
  out->stopped = out->n < max_new ? "eos" : (max_new == asked ? "max_tokens" : "context_length");
  if (!out->text.data) buf_str(&out->text, "");
  ok = 1;
done:
  OgaDestroyTokenizerStream(tstream);
  OgaDestroyGenerator(gen);
  OgaDestroyGeneratorParams(params);
  return ok;
}

/* the golden check of edgepack.json "smoke" (smoke_test.py's, for a device without Python): after the recorded
 * prompt, teacher-forced along the recorded reply, the device picks the recorded token at every clearly decided
 * position; then the greedy reply's speed. One JSON line; exit 0 ok, 1 misbehaves, 2 the model does not load */
static int smoke(const Args* a, const Loaded* m) {
  static const int32_t prompt[] = EDGEPACK_GOLDEN_PROMPT;
  static const int32_t gold[] = EDGEPACK_GOLDEN_TOKENS;
  static const unsigned char checked[] = EDGEPACK_GOLDEN_CHECKED;
  const size_t n_prompt = EDGEPACK_GOLDEN_PROMPT_COUNT, n_gold = EDGEPACK_GOLDEN_TOKENS_COUNT;
  int tokens = EDGEPACK_SMOKE_TOKENS > (int)n_gold ? EDGEPACK_SMOKE_TOKENS : (int)n_gold;
  Args greedy = *a;
  greedy.sample = 0;
  Reply r = {0};
  Buf out = {0}, problems = {0};
  int matched = 0, required = 0;
  buf_str(&problems, "[");
  if (!n_prompt) {  /* an unvalidated build recorded nothing to reproduce: speed only, as smoke_test.py */
    size_t n_ids = 0;
    greedy.prompt = "Hello.";
    greedy.raw = 0;
    greedy.system = NULL;
    int32_t* ids = prepare(&greedy, m, &n_ids);
    int ran = ids && generate(&greedy, m, ids, n_ids, tokens, 0, NULL, 0, &r);
    free(ids);
    if (!ran) return 1;
  } else if (!generate(&greedy, m, prompt, n_prompt, tokens, 0, gold, n_gold, &r)) {
    return 1;
  }
  /* teacher-forced: at each clearly decided position (not a near-tie the build saw) the device picks the golden
   * token, as smoke_test.py checks it */
  for (size_t i = 0; n_prompt && i < n_gold; i++) {
    int same = (int)i < r.n && r.tokens[i] == gold[i];
    if (!checked[i]) continue;
    required++;
    matched += same;
    if (!same) {
      char msg[200];
      snprintf(msg, sizeof msg, "at golden position %zu the device picked %d but the build recorded %d", i,
               (int)i < r.n ? r.tokens[i] : -1, gold[i]);
      buf_item(&problems, msg);
    }
  }
  if (!r.n) buf_item(&problems, "generated nothing");
  buf_str(&problems, "]");
  int ok = matched == required && r.n > 0;
  buf_str(&out, "{\"schema\": 1, \"ok\": ");
  buf_str(&out, ok ? "true" : "false");
  buf_fmt(&out, ", \"golden_match\": %.0f", matched);
  buf_fmt(&out, ", \"golden_required\": %.0f", required);
  print_smoke(&out, r.n, r.tokens_per_s, r.prefill_ms, problems.data);
  free(problems.data);
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  Args a = {0};
  if (!parse(argc, argv, &a)) {
    usage(stderr);
    return 2;
  }
  Loaded m = {0};
  double t0 = now_s();
  if (!load(&a, &m)) return a.smoke ? 2 : 1;
  double load_s = now_s() - t0;
  int rc;
  if (a.smoke) {
    rc = smoke(&a, &m);
  } else {
    size_t n_ids = 0;
    int32_t* ids = prepare(&a, &m, &n_ids);
    Reply r = {0};
    rc = ids && generate(&a, &m, ids, n_ids, a.max_tokens, !a.json, NULL, 0, &r) ? 0 : 1;
    if (!rc && !strcmp(r.stopped, "context_length"))
      fprintf(stderr, "[stopped at the bundle's context of %d tokens]\n", EDGEPACK_CONTEXT_LENGTH);
    if (!rc && a.json) {
      Buf out = {0};
      buf_str(&out, "{\"text\": ");
      buf_json(&out, r.text.data);
      buf_str(&out, ", \"tokens\": ");
      buf_tokens(&out, r.tokens, r.n);
      buf_fmt(&out, ", \"prompt_tokens\": %.0f, \"reused_tokens\": 0", (double)n_ids);
      buf_fmt(&out, ", \"context_length\": %.0f, \"speculative\": \"off\"", EDGEPACK_CONTEXT_LENGTH);
      print_reply(&out, r.n, r.prefill_ms, r.tokens_per_s, r.stopped, load_s);
    } else if (!rc) {
      print_summary(r.n, r.prefill_ms, r.tokens_per_s);
    }
    free(ids);
  }
  OgaDestroyTokenizer(m.tokenizer);
  OgaDestroyModel(m.model);
  OgaShutdown();
  return rc;
}
