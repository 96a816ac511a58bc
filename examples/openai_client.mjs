// The OpenAI API of the service from Node (18+), with plain fetch: one streamed chat, one completion.
//   node examples/openai_client.mjs http://127.0.0.1:8000/v1 ru-gpt-tiny
// Prints the streamed text as it comes, then one JSON line with what it got.
const [base = "http://127.0.0.1:8000/v1", model = "ru-gpt-tiny"] = process.argv.slice(2);
const headers = { "Content-Type": "application/json", Authorization: "Bearer " + (process.env.API_KEY || "none") };

async function streamedChat() {
  const response = await fetch(`${base}/chat/completions`, {
    method: "POST",
    headers,
    body: JSON.stringify({
      model,
      messages: [{ role: "user", content: "Расскажи о Москве." }],
      max_tokens: 16,
      seed: 1, // the same sampled reply every time (unseeded, a tiny model may end at once)
      stream: true,
    }),
  });
  if (!response.ok) throw new Error(`chat: HTTP ${response.status}: ${await response.text()}`);
  const decoder = new TextDecoder();
  let buffer = "", text = "", chunks = 0, finish = null;
  for await (const bytes of response.body) {
    buffer += decoder.decode(bytes, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      chunks += 1;
      text += choice.delta.content || "";
      finish = choice.finish_reason || finish;
      process.stdout.write(choice.delta.content || "");
    }
  }
  process.stdout.write("\n");
  return { text, chunks, finish };
}

async function completion() {
  const response = await fetch(`${base}/completions`, {
    method: "POST",
    headers,
    body: JSON.stringify({ model, prompt: "Москва — столица", max_tokens: 12, temperature: 0 }),
  });
  if (!response.ok) throw new Error(`completion: HTTP ${response.status}: ${await response.text()}`);
  return (await response.json()).choices[0].text;
}

const chat = await streamedChat();
const completionText = await completion();
console.log(JSON.stringify({
  chat_text: chat.text, chat_chunks: chat.chunks, finish_reason: chat.finish, completion_text: completionText,
}));
