// Renders Ollama chat prompts with Go's own text/template, the way Ollama's server fills a Modelfile TEMPLATE
// (test helper for fasttune's Modelfiles; see tests/golang/go_ollama.py).
//
// Input on stdin: a JSON list of cases {"template", "system", "messages": [{"role", "content", "thinking"}],
// "think", "is_think_set"}; "system" is the Modelfile's SYSTEM. Output on stdout: a JSON list of
// {"text"} or {"error"}, one per case.
//
// What follows Ollama (github.com/ollama/ollama, server/routes.go chat handler and template/template.go):
//   - the Modelfile SYSTEM becomes a system message in front when the first message is not a system message;
//   - messages are collated: system contents joined by "\n\n" into .System; consecutive messages of one role merged
//     with "\n\n" (tool messages excepted);
//   - the template sees a map with System, Messages (structs with Role, Content, Thinking, Images, ToolCalls,
//     ToolName, ToolCallID), Tools, Response "", Think, ThinkLevel, IsThinkSet, and Ollama's extra functions.
// Templates without .Messages (Ollama's legacy Prompt/Response path) are refused: fasttune writes none.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"time"
)

type inMessage struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
}

type inCase struct {
	Template   string      `json:"template"`
	System     string      `json:"system"`
	Messages   []inMessage `json:"messages"`
	Think      bool        `json:"think"`
	IsThinkSet bool        `json:"is_think_set"`
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []any
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

type result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":      func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate":    func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string { return "any" },
}

func render(c inCase) (string, error) {
	if !strings.Contains(c.Template, ".Messages") {
		return "", fmt.Errorf("template does not use .Messages (Ollama's legacy prompt path)")
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	msgs := c.Messages
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]inMessage{{Role: "system", Content: c.System}}, msgs...)
	}
	var system []string
	var collated []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &templateMessage{Role: m.Role, Content: m.Content, Thinking: m.Thinking})
		}
	}
	var b strings.Builder
	err = tmpl.Execute(&b, map[string]any{
		"System": strings.Join(system, "\n\n"), "Messages": collated, "Tools": nil, "Response": "",
		"Think": c.Think, "ThinkLevel": "", "IsThinkSet": c.IsThinkSet,
	})
	return b.String(), err
}

func main() {
	var cases []inCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	out := make([]result, len(cases))
	for i, c := range cases {
		text, err := render(c)
		if err != nil {
			out[i].Error = err.Error()
		} else {
			out[i].Text = &text
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "cannot write output:", err)
		os.Exit(2)
	}
}
