"""Pure data shared by every role: OpenAI wire schemas and runner messages."""
