/* edgepack-chat: the bundle's LiteRT-LM model from C, with no Python. Built by edgepack for the bundle's target;
 * the same source builds with native/CMakeLists.txt or with pkg-config (native/README.md).
 *
 *   native/edgepack-chat --prompt "Write a haiku about the sea."          streams the reply
 *   native/edgepack-chat --prompt "..." --json                            one JSON document, run.py's keys
 *   native/edgepack-chat --smoke                                          the bundle's golden check, one JSON line
 *
 * It finds liblitert-lm.so beside itself (RUNPATH $ORIGIN) and the model in ../model/model.litertlm, or --model
 * DIR; LiteRT-LM's weight cache goes to ../.cache/litert-lm where it can be written, as run.py's does. A chat
 * goes through LiteRT-LM's conversation (the model's own chat template); --raw through a session. Greedy is
 * top-k 1, as run.py asks for it. Exit codes: 0 done, 1 failed, 2 bad arguments; --smoke: 2 when the model cannot
 * load, as smoke_test.py.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/stat.h>

#include "edgepack_bundle.h"
#include "edgepack_litert_lm.h"

#define EDGEPACK_RUNTIME "litert-lm " EDGEPACK_LITERT_LM_VERSION
#include "edgepack_util.h"

typedef struct {
  LiteRtLmEngine* engine;
} Loaded;

static int load(const Args* a, Loaded* m) {
  static char model[PATH_MAX + 32], cache[PATH_MAX + 32];
  const char* dir = model_dir(a);
  snprintf(model, sizeof model, "%s/model.litertlm", dir);
  if (access(model, R_OK) != 0) {
    fprintf(stderr, "error: cannot read %s\n  (pass --model DIR where the model is elsewhere)\n", model);
    return 0;
  }
  snprintf(cache, sizeof cache, "%s/../.cache", dir);
  mkdir(cache, 0755);
  strcat(cache, "/litert-lm");
  int cached = mkdir(cache, 0755) == 0 || errno == EEXIST;
  litert_lm_set_min_log_level(LITERT_LM_LOG_ERROR);
  LiteRtLmEngineSettings* settings = litert_lm_engine_settings_create(model, "cpu", NULL, NULL);
  if (!settings) {
    fprintf(stderr, "error: cannot make engine settings for %s\n", model);
    return 0;
  }
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  litert_lm_engine_settings_set_num_threads(settings, a->threads > 0 ? a->threads : (cpus > 4 || cpus < 1 ? 4 : (int)cpus));
  if (cached) litert_lm_engine_settings_set_cache_dir(settings, cache);
  m->engine = litert_lm_engine_create(settings);
  litert_lm_engine_settings_delete(settings);
  if (!m->engine) fprintf(stderr, "error: cannot load the model %s with LiteRT-LM\n", model);
  return m->engine != NULL;
}

static int count_tokens(const Loaded* m, const char* text) {
  LiteRtLmTokenizeResult* r = litert_lm_engine_tokenize(m->engine, text);
  if (!r) return -1;
  int n = (int)litert_lm_tokenize_result_get_num_tokens(r);
  litert_lm_tokenize_result_delete(r);
  return n;
}

static char* detokenize(const Loaded* m, const int32_t* ids, size_t n) {
  int* copy = malloc((n ? n : 1) * sizeof *copy);
  for (size_t i = 0; i < n; i++) copy[i] = ids[i];
  LiteRtLmDetokenizeResult* r = litert_lm_engine_detokenize(m->engine, copy, n);
  free(copy);
  const char* s = r ? litert_lm_detokenize_result_get_string(r) : NULL;
  char* out = strdup(s ? s : "");
  if (r) litert_lm_detokenize_result_delete(r);
  return out;
}

/* a JSON string literal at p (just after its opening quote), decoded into b as UTF-8; returns past its end */
static const char* json_string(Buf* b, const char* p) {
  while (*p && *p != '"') {
    if (*p != '\\') {
      buf_add(b, p++, 1);
      continue;
    }
    p++;
    char c = *p ? *p++ : 0, out[4];
    if (c == 'n') buf_str(b, "\n");
    else if (c == 't') buf_str(b, "\t");
    else if (c == 'r') buf_str(b, "\r");
    else if (c == 'b') buf_str(b, "\b");
    else if (c == 'f') buf_str(b, "\f");
    else if (c != 'u') buf_add(b, &c, 1);
    else {
      unsigned long cp = strtoul((char[5]){p[0], p[1], p[2], p[3], 0}, NULL, 16);
      p += strlen(p) >= 4 ? 4 : strlen(p);
      if (cp >= 0xD800 && cp < 0xDC00 && p[0] == '\\' && p[1] == 'u') {
        unsigned long lo = strtoul((char[5]){p[2], p[3], p[4], p[5], 0}, NULL, 16);
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        p += 6;
      }
      int n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
      if (n == 1) out[0] = (char)cp;
      if (n == 2) out[0] = (char)(0xC0 | cp >> 6), out[1] = (char)(0x80 | (cp & 0x3F));
      if (n == 3) out[0] = (char)(0xE0 | cp >> 12), out[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
                  out[2] = (char)(0x80 | (cp & 0x3F));
      if (n == 4) out[0] = (char)(0xF0 | cp >> 18), out[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
                  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), out[3] = (char)(0x80 | (cp & 0x3F));
      buf_add(b, out, (size_t)n);
    }
  }
  return *p ? p + 1 : p;
}

/* the text of a conversation's chunk: a JSON message whose "content" is a string or a list of {"type": "text",
 * "text": ...}; anything that is not JSON is text as it is (as litert-lm-api reads it) */
static void message_text(Buf* b, const char* chunk) {
  const char* p = chunk;
  while (*p == ' ' || *p == '\n') p++;
  if (*p != '{') {
    buf_str(b, chunk);
    return;
  }
  const char* content = strstr(p, "\"content\"");
  if (!content) return;
  content += 9;
  while (*content == ' ' || *content == ':') content++;
  if (*content == '"') {
    json_string(b, content + 1);
    return;
  }
  for (const char* t = strstr(content, "\"text\""); t; t = strstr(t, "\"text\"")) {
    t += 6;
    while (*t == ' ') t++;
    if (*t != ':') continue;  /* "text" as a value ("type": "text"), not a key */
    t++;
    while (*t == ' ') t++;
    if (*t == '"') t = json_string(b, t + 1);
  }
}

/* chunks arrive on a thread of the library: gathered under a lock, the caller waits for the final one */
typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int done, json, stream, n;
  Buf text;
  char* error;
  double t_first;
} Stream;

static void on_chunk(void* data, const LiteRtLmStreamChunk* chunk) {
  Stream* s = data;
  const char* err = litert_lm_stream_chunk_get_error(chunk);
  const char* text = err ? NULL : litert_lm_stream_chunk_get_text(chunk);
  int final = err || litert_lm_stream_chunk_is_final(chunk);
  pthread_mutex_lock(&s->lock);
  /* the reply's end by length or a cancel is an ordinary end, as litert-lm-api reads it */
  if (err && !strstr(err, "CANCELLED") && !strstr(err, "Max number of tokens reached") && !s->error)
    s->error = strdup(err);
  if (text && *text) {
    Buf piece = {0};
    if (s->json)
      message_text(&piece, text);
    else
      buf_str(&piece, text);
    if (piece.len) {
      if (!s->n++) s->t_first = now_s();
      buf_str(&s->text, piece.data);
      if (s->stream) {
        fputs(piece.data, stdout);
        fflush(stdout);
      }
    }
    free(piece.data);
  }
  if (final) {
    s->done = 1;
    pthread_cond_signal(&s->cond);
  }
  pthread_mutex_unlock(&s->lock);
}

static void wait_final(Stream* s) {
  pthread_mutex_lock(&s->lock);
  while (!s->done) pthread_cond_wait(&s->cond, &s->lock);
  pthread_mutex_unlock(&s->lock);
}

static LiteRtLmSessionConfig* session_config(const Args* a, int max_new, int raw) {
  LiteRtLmSessionConfig* config = litert_lm_session_config_create();
  LiteRtLmSamplerParams* sampler = litert_lm_sampler_params_create(LITERT_LM_SAMPLER_TOP_P);
  if (!config || !sampler) return NULL;
  if (raw) litert_lm_session_config_set_apply_prompt_template(config, false);
  litert_lm_sampler_params_set_top_k(sampler, a->sample ? a->top_k : 1);
  litert_lm_sampler_params_set_top_p(sampler, a->sample ? (float)a->top_p : 0.95f);
  litert_lm_sampler_params_set_temperature(sampler, a->sample ? (float)a->temperature : 1.0f);
  litert_lm_sampler_params_set_seed(sampler, a->sample && a->has_seed ? a->seed : 0);
  litert_lm_session_config_set_sampler_params(config, sampler);
  litert_lm_sampler_params_delete(sampler);
  litert_lm_session_config_set_max_output_tokens(config, max_new);
  return config;
}

typedef struct {
  Buf text;
  int n, max_new;
  double prefill_ms, tokens_per_s;
  const char* stopped;
} Reply;

/* the reply to `text` (raw: a session, no template) or to a chat of the system message and `text` */
static int generate(const Args* a, const Loaded* m, const char* text, int raw, int n_prompt, int asked, int stream,
                    Reply* out) {
  int max_new = asked;
  if (EDGEPACK_CONTEXT_LENGTH && n_prompt >= EDGEPACK_CONTEXT_LENGTH) {
    fprintf(stderr,
            "error: the prompt is %d tokens; this bundle's context holds %d (prompt + reply). Shorten the prompt "
            "or build with a longer runtime.context_length.\n",
            n_prompt, EDGEPACK_CONTEXT_LENGTH);
    return 0;
  }
  if (EDGEPACK_CONTEXT_LENGTH && n_prompt + max_new > EDGEPACK_CONTEXT_LENGTH)
    max_new = EDGEPACK_CONTEXT_LENGTH - n_prompt;
  Stream s = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .json = !raw, .stream = stream};
  double t0 = now_s();
  LiteRtLmSessionConfig* config = session_config(a, max_new, raw);
  LiteRtLmSession* session = NULL;
  LiteRtLmConversation* conversation = NULL;
  int started = -1;
  if (!config) {
    fputs("error: cannot make a session config\n", stderr);
    return 0;
  }
  if (raw) {
    session = litert_lm_engine_create_session(m->engine, config);
    LiteRtLmInputData* input = litert_lm_input_data_create(LITERT_LM_INPUT_TEXT, text, strlen(text));
    if (session && input && litert_lm_session_run_prefill(session, &input, 1) == 0)
      started = litert_lm_session_run_decode_async(session, on_chunk, &s);
    if (input) litert_lm_input_data_delete(input);
  } else {
    LiteRtLmConversationConfig* cc = litert_lm_conversation_config_create();
    if (cc) {
      litert_lm_conversation_config_set_session_config(cc, config);
      if (a->system) litert_lm_conversation_config_set_system_message(cc, a->system);
      conversation = litert_lm_conversation_create(m->engine, cc);
      litert_lm_conversation_config_delete(cc);
    }
    Buf message = {0};
    buf_str(&message, "{\"role\": \"user\", \"content\": ");
    buf_json(&message, text);
    buf_str(&message, "}");
    if (conversation)
      started = litert_lm_conversation_send_message_stream(conversation, message.data, "{}", NULL, on_chunk, &s);
    free(message.data);
  }
  litert_lm_session_config_delete(config);
  if (started == 0) wait_final(&s);
  if (session) litert_lm_session_delete(session);
  if (conversation) litert_lm_conversation_delete(conversation);
  if (started != 0 || s.error) {
    fprintf(stderr, "error: LiteRT-LM could not %s: %s\n", started != 0 ? "start the reply" : "finish the reply",
            s.error ? s.error : "no reason given");
    free(s.error);
    return 0;
  }
  double t_end = now_s();
  if (!s.n) s.t_first = t_end;
  out->text = s.text;
  if (!out->text.data) buf_str(&out->text, "");
  out->n = s.n;
  out->max_new = max_new;
  out->prefill_ms = (s.t_first - t0) * 1000.0;
  out->tokens_per_s = s.n > 1 && t_end > s.t_first ? (s.n - 1) / (t_end - s.t_first) : -1;
  out->stopped = s.n < max_new ? "eos" : "max_tokens";
  return 1;
}

/* the golden check of edgepack.json "smoke" (smoke_test.py's for a runtime without logits): the greedy reply to
 * the recorded prompt starts with the recorded reply's text up to the first near-tie the build saw */
static int smoke(const Args* a, const Loaded* m) {
  static const int32_t prompt[] = EDGEPACK_GOLDEN_PROMPT;
  static const int32_t gold[] = EDGEPACK_GOLDEN_TOKENS;
  static const unsigned char checked[] = EDGEPACK_GOLDEN_CHECKED;
  const size_t n_prompt = EDGEPACK_GOLDEN_PROMPT_COUNT, n_gold = EDGEPACK_GOLDEN_TOKENS_COUNT;
  int tokens = EDGEPACK_SMOKE_TOKENS > (int)n_gold ? EDGEPACK_SMOKE_TOKENS : (int)n_gold;
  size_t prefix = 0;
  while (prefix < n_gold && checked[prefix]) prefix++;
  Args greedy = *a;
  greedy.sample = 0;
  greedy.system = NULL;
  char* text = n_prompt ? detokenize(m, prompt, n_prompt) : strdup("Hello.");
  char* expected = detokenize(m, gold, n_prompt ? prefix : 0);
  Reply r = {0};
  int ran = generate(&greedy, m, text, n_prompt != 0, n_prompt ? (int)n_prompt : 1, tokens, 0, &r);
  free(text);
  if (!ran) {
    free(expected);
    return 1;
  }
  int prefix_ok = strncmp(r.text.data, expected, strlen(expected)) == 0;
  Buf out = {0};
  int ok = prefix_ok && r.n > 0;
  buf_str(&out, "{\"schema\": 1, \"ok\": ");
  buf_str(&out, ok ? "true" : "false");
  buf_fmt(&out, ", \"golden_match\": %.0f", prefix_ok ? (double)prefix : 0);
  buf_fmt(&out, ", \"golden_required\": %.0f, \"greedy_text_prefix_ok\": ", (double)prefix);
  buf_str(&out, prefix_ok ? "true" : "false");
  Buf problems = {0};
  buf_str(&problems, "[");
  if (!prefix_ok) {
    Buf msg = {0};
    buf_str(&msg, "the greedy reply differs from the build's: ");
    buf_str(&msg, r.text.data);
    buf_str(&msg, " vs ");
    buf_str(&msg, expected);
    buf_item(&problems, msg.data);
    free(msg.data);
  }
  if (!r.n) buf_item(&problems, "generated nothing");
  buf_str(&problems, "]");
  print_smoke(&out, r.n, r.tokens_per_s, r.prefill_ms, problems.data);
  free(problems.data);
  free(expected);
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
    /* the prompt's tokens as run.py counts them: the text, or each message's content plus 8 for its markup */
    int n_prompt = count_tokens(&m, a.prompt);
    if (!a.raw) n_prompt += 8 + (a.system ? count_tokens(&m, a.system) + 8 : 0);
    Reply r = {0};
    rc = n_prompt >= 0 && generate(&a, &m, a.prompt, a.raw, n_prompt, a.max_tokens, !a.json, &r) ? 0 : 1;
    if (!rc && a.json) {
      Buf out = {0};
      buf_str(&out, "{\"text\": ");
      buf_json(&out, r.text.data);
      buf_fmt(&out, ", \"prompt_tokens\": %.0f", n_prompt);
      print_reply(&out, r.n, r.prefill_ms, r.tokens_per_s, r.stopped, load_s);
    } else if (!rc) {
      print_summary(r.n, r.prefill_ms, r.tokens_per_s);
    }
  }
  litert_lm_engine_delete(m.engine);
  return rc;
}
